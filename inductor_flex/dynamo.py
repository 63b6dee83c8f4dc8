"""Dynamo capture rule for ``torch.ops.higher_order.inductor_flex_attention``.

When Dynamo meets a call of the forward operator it cannot put the user's ``score_mod``
and ``mask_mod`` callables into the graph as they are. This rule traces each of them once,
on scalar example inputs, into an FX subgraph (``speculate_subgraph``), turns every tensor
the callable closes over into an explicit trailing input of that subgraph, and emits a
single graph node::

    inductor_flex_attention(query, key, value, score_mod_graph,
                            block_mask.with_mask_mod(mask_mod_graph), scale, kernel_options,
                            score_mod_other_buffers, mask_mod_other_buffers)

with the argument order of docs/internals.md. Guards on whatever Python state the mods
read come from the speculation, so changing such a value recompiles, while changing the
values inside a captured tensor does not. A missing score_mod / mask_mod is recorded as
:func:`_mods.identity_score_mod` / :func:`noop_mask`, so the node always carries two
GraphModules; the block sizes (tuple items 10 and 11) are always plain ints.

The buffers are tensors, with one exception: a mod that reads a symbolic Python number
(under dynamic shapes, say ``window = q.shape[2] // 4`` closed over) gets that SymInt /
SymFloat as a buffer, since Dynamo lifts it like a tensor. Size symbols that Dynamo lifts
along with a dynamic-shaped tensor but the mod never reads are dropped.

Indexing a captured tensor with the scalar index tensors (``bias[b, h][q_idx]``) would
normally read the index value (``.item()``), which no tracer can do. While a mod is
speculated, a torch-function mode computes such indexing with ``aten.index`` instead,
and afterwards the matching graph nodes are pointed at :func:`getitem_with_index_tensors`, so the
recorded subgraphs are self-contained: they run the same in eager, under ``vmap`` and
under AOTAutograd's tracing, with no mode needed around them.
"""
from __future__ import annotations

import operator
from typing import Any, Sequence

import torch
import torch.fx

from inductor_flex import _compat
from inductor_flex._block_lists import OperatorBlockMask
from inductor_flex._indexing import getitem_with_index_tensors, index_with_tensors, tensor_index_parts
from inductor_flex._mods import identity_score_mod
from inductor_flex.block_mask import noop_mask
from inductor_flex.ops.forward import inductor_flex_attention

__all__ = [
    "InductorFlexAttentionVariable",
    "getitem_with_index_tensors",
    "register",
]

# Parameter order of the forward operator (docs/internals.md).
_OPERATOR_PARAMETERS = (
    "query",
    "key",
    "value",
    "score_mod",
    "block_mask",
    "scale",
    "kernel_options",
    "score_mod_other_buffers",
    "mask_mod_other_buffers",
)
_OPTIONAL_PARAMETERS = ("score_mod_other_buffers", "mask_mod_other_buffers")
_BLOCK_MASK_TUPLE_LENGTH = len(OperatorBlockMask._fields)
# The sparse block sizes fix the kernels' tile shapes, so the graph must carry them as ints
# even where Dynamo made them symbolic (it does for ints read from a BlockMask input under
# dynamic=True).
_SPECIALIZED_FIELDS = ("q_block_size", "kv_block_size")


def _example_value(arg: Any) -> Any:
    if isinstance(arg, torch.fx.Node):
        return arg.meta.get("example_value", arg.meta.get("val"))
    return arg


def route_tensor_indexing(gm: torch.fx.GraphModule) -> None:
    """Point every ``operator.getitem`` node of ``gm`` (and of the graph modules it
    holds) that indexes a tensor with integer tensors at :func:`getitem_with_index_tensors`."""
    changed = False
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            held = getattr(gm, node.target, None)
            if isinstance(held, torch.fx.GraphModule):
                route_tensor_indexing(held)
            continue
        if node.op != "call_function" or node.target is not operator.getitem:
            continue
        if len(node.args) != 2 or not isinstance(_example_value(node.args[0]), torch.Tensor):
            continue
        index = torch.fx.node.map_aggregate(node.args[1], _example_value)
        if tensor_index_parts(index) is not None:
            node.target = getitem_with_index_tensors
            changed = True
    if changed:
        gm.recompile()


# --------------------------------------------------------------------------------------
# The Dynamo variable
# --------------------------------------------------------------------------------------

_hop_variables = _compat.dynamo_hop_variables_module()


def _unsupported(summary: str, context: str, explanation: str, hints: Sequence[str] = ()):
    _compat.dynamo_unsupported(
        gb_type=f"inductor_flex_attention: {summary}",
        context=context,
        explanation=explanation,
        hints=list(hints),
    )


def _bind_operator_arguments(args: list, kwargs: dict) -> dict:
    if len(args) > len(_OPERATOR_PARAMETERS):
        _unsupported("too many arguments", f"{len(args)} positional arguments",
                     f"The operator takes at most {len(_OPERATOR_PARAMETERS)} arguments "
                     f"({', '.join(_OPERATOR_PARAMETERS)}).")
    bound = dict(zip(_OPERATOR_PARAMETERS, args))
    for name, arg in kwargs.items():
        if name not in _OPERATOR_PARAMETERS or name in bound:
            _unsupported("bad keyword argument", name,
                         f"`{name}` is not a parameter of the operator or was given twice.")
        bound[name] = arg
    missing = [n for n in _OPERATOR_PARAMETERS if n not in bound and n not in _OPTIONAL_PARAMETERS]
    if missing:
        _unsupported("missing arguments", ", ".join(missing),
                     f"The operator call lacks {', '.join(missing)}.")
    return bound


class InductorFlexAttentionVariable(_hop_variables.TorchHigherOrderOperatorVariable):
    """Dynamo's view of the forward operator: records score_mod and mask_mod as FX
    subgraphs and the call as one graph node."""

    _HOP_NAME = "torch.ops.higher_order.inductor_flex_attention"
    # A mod Dynamo cannot trace makes the call fall back to eager (a graph break), as
    # for any other Python code; fullgraph=True turns that into an error.
    _ALLOW_FALLBACK_TO_EAGER = True

    def _capture(self, tx, args, kwargs):
        from torch._dynamo.variables import TensorVariable
        from torch._dynamo.variables.builder import wrap_fx_proxy

        bound = _bind_operator_arguments(list(args), dict(kwargs))
        query = bound["query"].realize() if hasattr(bound["query"], "realize") else bound["query"]
        if not isinstance(query, TensorVariable):
            _unsupported("query is not a tensor", str(query),
                         "The operator's first argument must be the query tensor.")

        block_mask_items = self._unpack_sequence(tx, bound["block_mask"], "block_mask")
        if len(block_mask_items) != _BLOCK_MASK_TUPLE_LENGTH:
            _unsupported("malformed block mask tuple", f"{len(block_mask_items)} items",
                         f"The block mask must be the {_BLOCK_MASK_TUPLE_LENGTH}-item tuple of "
                         "BlockMask.operator_tuple() (docs/internals.md), mask_mod last.")
        given_score_buffers = self._unpack_sequence(
            tx, bound.get("score_mod_other_buffers"), "score_mod_other_buffers")
        given_mask_buffers = self._unpack_sequence(
            tx, bound.get("mask_mod_other_buffers"), "mask_mod_other_buffers")

        score_mod = self._callable_or_default(tx, bound["score_mod"], identity_score_mod)
        block_mask_items = OperatorBlockMask(*block_mask_items)
        mask_mod = self._callable_or_default(tx, block_mask_items.mask_mod, noop_mask)

        score_examples, index_examples = self._example_inputs(tx, query)
        score_mod_node, score_buffers = self._capture_mod(
            tx, score_mod, [score_examples, *index_examples], given_score_buffers,
            "score_mod")
        mask_mod_node, mask_buffers = self._capture_mod(
            tx, mask_mod, list(index_examples), given_mask_buffers, "mask_mod")

        block_mask_proxies = OperatorBlockMask(**{
            field: _as_proxy(_specialized(item) if field in _SPECIALIZED_FIELDS else item)
            for field, item in block_mask_items._asdict().items() if field != "mask_mod"},
            mask_mod=mask_mod_node)
        kernel_options_arg = _constant_options(bound["kernel_options"])
        if kernel_options_arg is None:
            kernel_options_arg = _as_proxy(bound["kernel_options"])

        node_args = (
            _as_proxy(bound["query"]),
            _as_proxy(bound["key"]),
            _as_proxy(bound["value"]),
            score_mod_node,
            tuple(block_mask_proxies),
            _as_proxy(bound["scale"]),
            kernel_options_arg,
            tuple(score_buffers),
            tuple(mask_buffers),
        )
        proxy = tx.output.create_proxy("call_function", self.value, node_args, {})
        # example_value=None: the output's fake values come from running the operator's
        # fake registration on the node's (fake) arguments.
        return wrap_fx_proxy(tx=tx, proxy=proxy, example_value=None)

    # Dynamo >= 2.13 calls `_call_function` after its torch-function check; older
    # versions call `call_function` directly (see _compat).
    if _compat.hop_variable_splits_call_function():
        def _call_function(self, tx, args, kwargs):
            return self._capture(tx, args, kwargs)
    else:
        def call_function(self, tx, args, kwargs):
            return self._capture(tx, args, kwargs)

    @staticmethod
    def _unpack_sequence(tx, variable, name: str) -> list:
        if variable is None:
            return []
        if hasattr(variable, "realize"):
            variable = variable.realize()
        if variable.is_python_constant() and variable.as_python_constant() is None:
            return []
        try:
            return list(variable.unpack_var_sequence(tx))
        except NotImplementedError:
            _unsupported(f"{name} is not a sequence", str(variable),
                         f"`{name}` must be a tuple or list.")

    @staticmethod
    def _callable_or_default(tx, variable, default):
        if hasattr(variable, "realize"):
            variable = variable.realize()
        if variable.is_python_constant() and variable.as_python_constant() is None:
            return _compat.dynamo_build_variable(tx, default)
        return variable

    @staticmethod
    def _example_inputs(tx, query):
        """0-d example inputs of the mods: a score in the query's dtype and int32
        ``b, h, q_idx, kv_idx`` on the query's device. They are made with graph calls
        that are discarded at once; only their example values are used."""
        build = _compat.dynamo_build_variable
        score_requires_grad = bool(query.requires_grad) and torch.is_grad_enabled()
        with _compat.dynamo_discard_graph_changes(tx):
            score = query.call_method(
                tx, "new_empty", [build(tx, ())],
                {"requires_grad": build(tx, score_requires_grad)})
            indices = [
                query.call_method(tx, "new_empty", [build(tx, ())],
                                  {"dtype": build(tx, torch.int32)})
                for _ in range(4)
            ]
        return score, indices

    def _capture_mod(self, tx, mod, example_args: list, given_buffers: list, role: str):
        """Trace ``mod`` into a subgraph installed on the output graph; returns the
        ``get_attr`` proxy of the subgraph and the proxies of its buffers (those given,
        then the tensors it closed over)."""
        from torch._dynamo.variables import TensorVariable

        description = f"inductor_flex_attention {role}"
        with index_with_tensors():
            (output, _spec), graph, lifted_freevars = _hop_variables.speculate_subgraph(
                tx,
                mod,
                example_args + list(given_buffers),
                {},
                description=description,
                source_target=self.value,
                set_subgraph_inputs="manual",
            )
        if not isinstance(output, TensorVariable):
            _unsupported(f"{role} must return one tensor", str(output),
                         f"The {role} returned {output.python_type().__name__}; it must "
                         "return a single tensor (a 0-d tensor for one position).",
                         [f"Return a tensor, e.g. `torch.tensor(...)` or a tensor "
                          f"expression of the {role}'s inputs."])

        # Placeholders are the explicit inputs then the lifted free variables, in
        # order; map each lifted placeholder back to the outer value it stands for.
        outer_by_placeholder = {inner.node: outer for outer, inner in lifted_freevars.items()}
        placeholders = [n for n in graph.nodes if n.op == "placeholder"]
        lifted = []
        for placeholder in placeholders[len(example_args) + len(given_buffers):]:
            # With dynamic shapes Dynamo also lifts the size symbols of every lifted
            # tensor; when the body never reads one, drop it so the buffers stay tensors.
            if not placeholder.users and not isinstance(_example_value(placeholder), torch.Tensor):
                graph.erase_node(placeholder)
                continue
            lifted.append(outer_by_placeholder[placeholder])

        gm = torch.fx.GraphModule(tx.output.nn_modules, graph)
        route_tensor_indexing(gm)
        name = tx.output.install_subgraph(f"inductor_flex_{role}", gm)
        attr_proxy = tx.output.create_proxy("get_attr", name, (), {})
        buffers = [_as_proxy(b) for b in given_buffers] + lifted
        return attr_proxy, buffers


def _specialized(variable):
    """A symbolic int as a constant, guarded on its current value."""
    from torch._dynamo.variables import ConstantVariable, SymNodeVariable

    if hasattr(variable, "realize"):
        variable = variable.realize()
    if isinstance(variable, SymNodeVariable):
        return ConstantVariable.create(variable.evaluate_expr())
    return variable


def _constant_options(variable):
    """kernel_options as a plain dict, or None when an entry is not a constant. An int that
    Dynamo made symbolic (it changed between calls) is specialised: options pick kernels
    and launch shapes, so each value must be known when the kernel is generated."""
    from torch._dynamo.variables import ConstDictVariable

    if hasattr(variable, "realize"):
        variable = variable.realize()
    if variable.is_python_constant():
        return variable.as_python_constant() or {}
    if not isinstance(variable, ConstDictVariable):
        return None
    options = {}
    for key, value in variable.items.items():
        key, value = _specialized(key.vt), _specialized(value)
        if not (key.is_python_constant() and value.is_python_constant()):
            return None
        options[key.as_python_constant()] = value.as_python_constant()
    return options


def _as_proxy(variable):
    if hasattr(variable, "realize"):
        variable = variable.realize()
    return variable.as_proxy()


def register() -> None:
    """Teach Dynamo to capture calls of ``inductor_flex_attention`` (idempotent)."""
    registry = _compat.dynamo_hop_variable_registry()
    registry[inductor_flex_attention.__name__] = InductorFlexAttentionVariable
