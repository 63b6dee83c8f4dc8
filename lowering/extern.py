"""Inductor fallback for both operators: the exact chunked dense kernel as an extern call.

Choice. The dense implementation (``inductor_flex/ops/dense.py``) evaluates the mods with
``vmap`` over a chunk of the score grid, so it must run as Python, not as generated code.
We therefore wrap it in two ``torch.library`` custom ops,

- ``inductor_flex::dense_forward``  -> (out, lse, max_scores)
- ``inductor_flex::dense_backward`` -> (grad_query, grad_key, grad_value, grad_buffers)

and lower the higher-order operators to them with Inductor's ordinary fallback machinery
(``fallback_handler`` -> ``ir.FallbackKernel``). The generated program then calls the custom
op like any other extern kernel: buffers are planned around it, shapes may be symbolic (the
custom ops read sizes off the tensors at run time; block sizes and int buffers are SymInt
arguments; a scale that depends on sizes travels as an expression, see ``scale_args``), and
memory stays that of the eager path, O(chunk x KV_LEN). An ir.Subgraph / invoke_subgraph
route was not taken: it would hand Inductor the mods to compile as ordinary code, but the
dense kernel needs them as Python callables it can vmap and differentiate.

A custom op cannot take a GraphModule, so the mods travel as Python source: the subgraph's
generated ``forward`` code plus the imports of the globals it uses, which makes the text
self-contained. Tensor constants a subgraph reads (``get_attr``) become separate tensor
arguments, registered as graph constants, appended to the mod's arguments at run time.
Buffers that are ints travel apart from tensor buffers and are merged back in order. At
run time each distinct source is compiled once and cached (``mod_from_source``). The
backward also gets the joint graph reduced to the score gradient, so a custom backward
inside a mod is honoured (``inductor_flex.ops.backward.with_score_gradient``).

Both kernels run as leaf code (``ops._shared.as_leaf_kernel``): whatever dispatch mode the
generated program is called under has already seen the custom-op call.

The ops' fake implementations give exactly the layouts the operators' fake rules give (out
in the query's memory order, gradients in their inputs' layouts), and the real
implementations return those layouts too, since Inductor checks the strides of extern
outputs.
"""
import math
import importlib
from typing import Callable, Optional, Sequence

import torch
import torch.fx
from torch import Tensor
from torch.fx.graph import _custom_builtins

from inductor_flex import _compat
from inductor_flex._block_lists import OperatorBlockMask
from inductor_flex._mods import batchable, identity_score_mod
from inductor_flex.ops.backward import (
    in_layouts_of_inputs,
    match_layout,
    score_gradient_graph,
    with_score_gradient,
)
from inductor_flex.ops._shared import as_leaf_kernel, empty_in_layout_of, joint_graph_buffer_grads
from inductor_flex.ops.fused_tiles import FusedTiles, TileKernels

from .subgraphs import is_identity_score_mod

# ---------------------------------------------------------------------------------------
# Mods as source text
# ---------------------------------------------------------------------------------------

_MOD_FUNCTION_NAME = "forward"
_compiled_mods: dict[str, Callable] = {}


def _import_line(name: str, value: object) -> str:
    """A line of Python that binds ``name`` to ``value`` when executed, or raise."""
    builtin = _custom_builtins.get(name)
    if builtin is not None and builtin.obj is value:
        return builtin.import_str  # FX's own names: "import torch", "from math import inf", ...
    module = getattr(value, "__module__", None)
    qualname = getattr(value, "__qualname__", None)
    if module and qualname and "<" not in qualname:
        try:
            found = importlib.import_module(module)
            for part in qualname.split("."):
                found = getattr(found, part)
        except (ImportError, AttributeError):
            found = None
        if found is value:
            return f"{name} = __import__('importlib').import_module({module!r}).{qualname}"
    raise RuntimeError(
        f"inductor_flex extern fallback: a score_mod/mask_mod graph refers to {value!r} (as "
        f"{name!r}), which cannot be named from source code; only importable functions, "
        f"classes and torch ops are supported in mods")


def _lift_tensor_constants(graph_module: torch.fx.GraphModule) -> tuple[torch.fx.Graph, list]:
    """A copy of the graph whose tensor ``get_attr`` nodes are trailing placeholders;
    returns it and the attribute values, in placeholder order."""
    graph = torch.fx.Graph()
    env: dict = {}
    constants = []
    nodes = list(graph_module.graph.nodes)
    for node in nodes:
        if node.op == "placeholder":
            env[node] = graph.node_copy(node, lambda n: env[n])
    for node in nodes:
        if node.op != "get_attr":
            continue
        value = graph_module
        for part in node.target.split("."):
            value = getattr(value, part)
        if not isinstance(value, Tensor):
            raise RuntimeError(
                f"inductor_flex extern fallback: a score_mod/mask_mod graph reads attribute "
                f"{node.target!r} of type {type(value).__name__}; only tensors are supported "
                f"(nested subgraphs inside a mod are not)")
        env[node] = graph.placeholder(f"mod_constant_{len(constants)}")
        constants.append(value)
    for node in nodes:
        if node.op not in ("placeholder", "get_attr"):
            env[node] = graph.node_copy(node, lambda n: env[n])
    return graph, constants


def mod_to_source(graph_module: torch.fx.GraphModule) -> tuple[str, list]:
    """Self-contained Python source defining ``forward(self, *args)`` for a mod's graph.

    Returns the source and the tensor constants the graph read, which the caller passes
    as trailing arguments (after the mod's own buffers). The source is that of the graph's
    ``batchable`` copy, since the dense kernel runs the mod under vmap.
    """
    graph, constants = _lift_tensor_constants(batchable(graph_module))
    code = graph.python_code(root_module="self")
    lines = sorted({_import_line(name, value) for name, value in code.globals.items()
                    if not name.startswith("__")})
    return "\n".join(lines) + "\n\n" + code.src.lstrip("\n"), constants


def mod_from_source(source: str) -> Callable:
    """The mod defined by ``source`` (from ``mod_to_source``), compiled once per text."""
    mod = _compiled_mods.get(source)
    if mod is None:
        namespace: dict = {}
        exec(compile(source, "<inductor_flex mod>", "exec"), namespace)
        forward = namespace[_MOD_FUNCTION_NAME]

        def mod(*args):
            return forward(None, *args)

        _compiled_mods[source] = mod
    return mod


# ---------------------------------------------------------------------------------------
# A scale that depends on symbolic sizes
# ---------------------------------------------------------------------------------------
# Under dynamic shapes the default scale 1/sqrt(E) is a symbolic float, which an extern
# call cannot take as a float argument. It travels as the text of a function of the
# symbols it depends on, plus their values (SymInts, which the call site fills in).

_compiled_scales: dict[str, Callable] = {}


def scale_args(scale) -> tuple:
    """``(scale, scale_source, scale_symbols)`` arguments of the custom ops for a lowering's scale."""
    import sympy

    if not isinstance(scale, sympy.Expr) or scale.is_number:
        return float(scale), "", []
    from torch.utils._sympy.printers import PythonPrinter

    symbols = sorted(scale.free_symbols, key=str)
    source = f"lambda {', '.join(map(str, symbols))}: {PythonPrinter().doprint(scale)}"
    return 0.0, source, list(symbols)


def scale_value(scale: float, scale_source: str, scale_symbols: Sequence[int]) -> float:
    """The scale at run time: ``scale``, or ``scale_source`` evaluated at ``scale_symbols``."""
    if not scale_source:
        return scale
    function = _compiled_scales.get(scale_source)
    if function is None:
        function = eval(compile(scale_source, "<inductor_flex scale>", "eval"),
                        {"torch": torch, "math": math})
        _compiled_scales[scale_source] = function
    return float(function(*scale_symbols))


# ---------------------------------------------------------------------------------------
# The custom ops
# ---------------------------------------------------------------------------------------

def _block_mask_tuple(query: Tensor, key: Tensor, kv_num_blocks, kv_indices, full_kv_num_blocks,
                      full_kv_indices, q_block_size, kv_block_size, mask_mod) -> tuple:
    # The dense kernel reads only the kv-side block lists; the q-side ones stay None.
    return tuple(OperatorBlockMask(
        query.shape[2], key.shape[2], kv_num_blocks, kv_indices, full_kv_num_blocks,
        full_kv_indices, q_num_blocks=None, q_indices=None, full_q_num_blocks=None,
        full_q_indices=None, q_block_size=q_block_size, kv_block_size=kv_block_size,
        mask_mod=mask_mod))


def bound_mod(source: str, constants: Sequence[Tensor]) -> Callable:
    """The mod compiled from ``source``, with its lifted constants appended to every call;
    an empty source is the identity score_mod (the dense kernel then skips the mod)."""
    if not source:
        return identity_score_mod
    mod = mod_from_source(source)
    if not constants:
        return mod
    constants = tuple(constants)

    def with_constants(*args):
        return mod(*args, *constants)

    return with_constants


_tile_kernels: dict[tuple[str, str], TileKernels] = {}


def fused_tiles(score_mod_source: str, score_mod_constants: Sequence[Tensor] = (),
                score_gradient_source: str = "",
                score_gradient_constants: Sequence[Tensor] = ()) -> FusedTiles:
    """The dense kernels' fused tile kernels for one call (CPU): ``TileKernels`` compiled
    once per (score_mod source, score gradient source), an empty source being the identity
    (or, for the gradient, the score_mod's own vjp), bound to the call's lifted constants."""
    key = (score_mod_source, score_gradient_source)
    kernels = _tile_kernels.get(key)
    if kernels is None:
        kernels = _tile_kernels[key] = TileKernels(
            mod_from_source(score_mod_source) if score_mod_source else None,
            mod_from_source(score_gradient_source) if score_gradient_source else None)
    return FusedTiles(kernels, score_mod_constants, score_gradient_constants)


def merged_buffers(tensors: Sequence[Tensor], scalars: Sequence[int],
                   is_tensor: Sequence[bool]) -> tuple:
    """A mod's buffers in their original order, from the tensors and the ints (sizes a
    mod read, SymInts at compile time) that travel separately."""
    tensors, scalars = iter(tensors), iter(scalars)
    return tuple(next(tensors) if flag else next(scalars) for flag in is_tensor)


@torch.library.custom_op("inductor_flex::dense_forward", mutates_args=(),
                         tags=_compat.host_reading_op_tags())
def dense_forward(query: Tensor, key: Tensor, value: Tensor, kv_num_blocks: Tensor,
                  kv_indices: Tensor, full_kv_num_blocks: Optional[Tensor],
                  full_kv_indices: Optional[Tensor], q_block_size: int, kv_block_size: int,
                  scale: float, scale_source: str, scale_symbols: list[int],
                  score_mod_source: str, score_mod_tensors: list[Tensor],
                  score_mod_scalars: list[int], score_mod_is_tensor: list[bool],
                  score_mod_constants: list[Tensor], mask_mod_source: str,
                  mask_mod_tensors: list[Tensor], mask_mod_scalars: list[int],
                  mask_mod_is_tensor: list[bool], mask_mod_constants: list[Tensor]
                  ) -> tuple[Tensor, Tensor, Tensor]:
    """Forward of inductor_flex_attention by the exact chunked dense kernel.

    Each mod is its source (``mod_to_source``); the operator's buffers for it, split into
    tensors and ints (``merged_buffers``); and the tensor constants its graph read, which
    are passed after the buffers.
    """
    from inductor_flex.ops.dense import dense_attention

    block_mask = _block_mask_tuple(query, key, kv_num_blocks, kv_indices, full_kv_num_blocks,
                                   full_kv_indices, q_block_size, kv_block_size,
                                   bound_mod(mask_mod_source, mask_mod_constants))
    scale = scale_value(scale, scale_source, scale_symbols)
    score_mod = bound_mod(score_mod_source, score_mod_constants)
    score_mod_buffers = merged_buffers(score_mod_tensors, score_mod_scalars, score_mod_is_tensor)
    mask_mod_buffers = merged_buffers(mask_mod_tensors, mask_mod_scalars, mask_mod_is_tensor)
    fused = fused_tiles(score_mod_source, score_mod_constants) if query.device.type == "cpu" else None
    with as_leaf_kernel():
        out, lse, max_scores = dense_attention(query, key, value, score_mod, block_mask, scale,
                                               score_mod_buffers, mask_mod_buffers,
                                               fused_tiles=fused)
    return match_layout(out, query), lse.contiguous(), max_scores.contiguous()


@dense_forward.register_fake
def _dense_forward_fake(query, key, value, kv_num_blocks, kv_indices, full_kv_num_blocks,
                        full_kv_indices, q_block_size, kv_block_size, scale, scale_source,
                        scale_symbols, score_mod_source, score_mod_tensors, score_mod_scalars,
                        score_mod_is_tensor, score_mod_constants, mask_mod_source,
                        mask_mod_tensors, mask_mod_scalars, mask_mod_is_tensor,
                        mask_mod_constants):
    batch, heads, q_len, _ = query.shape
    out = empty_in_layout_of(query, (batch, heads, q_len, value.shape[-1]))
    lse = query.new_empty((batch, heads, q_len), dtype=torch.float32)
    return out, lse, torch.empty_like(lse)


@torch.library.custom_op("inductor_flex::dense_backward", mutates_args=(),
                         tags=_compat.host_reading_op_tags())
def dense_backward(query: Tensor, key: Tensor, value: Tensor, out: Tensor, logsumexp: Tensor,
                   grad_out: Tensor, grad_logsumexp: Optional[Tensor], kv_num_blocks: Tensor,
                   kv_indices: Tensor, full_kv_num_blocks: Optional[Tensor],
                   full_kv_indices: Optional[Tensor], q_block_size: int, kv_block_size: int,
                   scale: float, scale_source: str, scale_symbols: list[int],
                   score_mod_source: str, score_mod_tensors: list[Tensor],
                   score_mod_scalars: list[int], score_mod_is_tensor: list[bool],
                   score_mod_constants: list[Tensor], score_gradient_source: str,
                   score_gradient_constants: list[Tensor], mask_mod_source: str,
                   mask_mod_tensors: list[Tensor], mask_mod_scalars: list[int],
                   mask_mod_is_tensor: list[bool], mask_mod_constants: list[Tensor],
                   buffers_requiring_grad: list[bool]
                   ) -> tuple[Tensor, Tensor, Tensor, list[Tensor]]:
    """Backward of inductor_flex_attention by the exact chunked dense kernel.

    ``score_gradient_source`` is the joint graph reduced to the score gradient
    (``score_gradient_graph``; called with the score_mod's buffers, then its own
    constants), or empty to differentiate the score_mod itself. The last output holds the
    gradients of the buffers flagged in ``buffers_requiring_grad``, and only those.
    """
    from inductor_flex.ops.dense import dense_attention_backward

    block_mask = _block_mask_tuple(query, key, kv_num_blocks, kv_indices, full_kv_num_blocks,
                                   full_kv_indices, q_block_size, kv_block_size,
                                   bound_mod(mask_mod_source, mask_mod_constants))
    scale = scale_value(scale, scale_source, scale_symbols)
    score_mod = bound_mod(score_mod_source, score_mod_constants)
    if score_gradient_source:
        score_mod = with_score_gradient(
            score_mod, bound_mod(score_gradient_source, score_gradient_constants))
    score_mod_buffers = merged_buffers(score_mod_tensors, score_mod_scalars, score_mod_is_tensor)
    mask_mod_buffers = merged_buffers(mask_mod_tensors, mask_mod_scalars, mask_mod_is_tensor)
    fused = None
    if query.device.type == "cpu":
        fused = fused_tiles(score_mod_source, score_mod_constants, score_gradient_source,
                            score_gradient_constants)
    with as_leaf_kernel():
        grads = dense_attention_backward(
            query, key, value, out, logsumexp, grad_out, grad_logsumexp, score_mod, block_mask,
            scale, score_mod_buffers, mask_mod_buffers,
            buffers_requiring_grad=list(buffers_requiring_grad), fused_tiles=fused)
    grad_query, grad_key, grad_value, grad_buffers = in_layouts_of_inputs(
        grads, query, key, value, score_mod_buffers)
    kept = [g for g, needed in zip(grad_buffers, buffers_requiring_grad) if needed]
    return grad_query, grad_key, grad_value, kept


@dense_backward.register_fake
def _dense_backward_fake(query, key, value, out, logsumexp, grad_out, grad_logsumexp,
                         kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices,
                         q_block_size, kv_block_size, scale, scale_source, scale_symbols,
                         score_mod_source, score_mod_tensors, score_mod_scalars,
                         score_mod_is_tensor, score_mod_constants, score_gradient_source,
                         score_gradient_constants, mask_mod_source, mask_mod_tensors,
                         mask_mod_scalars, mask_mod_is_tensor, mask_mod_constants,
                         buffers_requiring_grad):
    buffers = merged_buffers(score_mod_tensors, score_mod_scalars, score_mod_is_tensor)
    grads = [empty_in_layout_of(buf, buf.shape)
             for buf, needed in zip(buffers, buffers_requiring_grad) if needed]
    return (empty_in_layout_of(query, query.shape), empty_in_layout_of(key, key.shape),
            empty_in_layout_of(value, value.shape), grads)


# ---------------------------------------------------------------------------------------
# Lowerings
# ---------------------------------------------------------------------------------------

def _subgraph_module(mod) -> torch.fx.GraphModule:
    graph_module = getattr(mod, "graph_module", mod)
    if not isinstance(graph_module, torch.fx.GraphModule):
        raise RuntimeError(
            f"inductor_flex extern fallback: expected a traced score_mod/mask_mod subgraph, got "
            f"{type(mod).__name__}")
    return graph_module


def _mod_args(mod, buffers: Sequence, identity: bool = False) -> tuple:
    """``(source, tensors, scalars, is_tensor, constants)`` arguments of the custom ops for
    one mod and its buffers; the constants its graph reads become Inductor graph constants.
    ``identity``: the mod is the identity score_mod, sent as an empty source."""
    from torch._inductor import ir
    from torch._inductor.virtualized import V

    if identity:
        source, constants = "", []
    else:
        source, constants = mod_to_source(_subgraph_module(mod))
    boxes = [V.graph.add_tensor_constant(t, "inductor_flex_mod_constant") for t in constants]
    is_tensor = [isinstance(b, ir.IRNode) for b in buffers]
    tensors = [b for b, flag in zip(buffers, is_tensor) if flag]
    scalars = [b for b, flag in zip(buffers, is_tensor) if not flag]
    return source, tensors, scalars, is_tensor, boxes


def _fallback(op):
    from torch._inductor.lowering import fallback_handler

    return fallback_handler(op, add_to_fallback_set=False)


def _block_mask_args(block_mask: Sequence) -> tuple:
    mask = OperatorBlockMask(*block_mask)
    # Block sizes may be symbolic under dynamic shapes; the op takes them as SymInts.
    return (mask.kv_num_blocks, mask.kv_indices, mask.full_kv_num_blocks, mask.full_kv_indices,
            mask.q_block_size, mask.kv_block_size), mask.mask_mod


def lower_forward_extern(query, key, value, score_mod, block_mask, scale, kernel_options,
                         score_mod_other_buffers=(), mask_mod_other_buffers=()):
    """Lower ``inductor_flex_attention`` to a call of ``inductor_flex::dense_forward``."""
    mask_args, mask_mod = _block_mask_args(block_mask)
    out, lse, max_scores = _fallback(torch.ops.inductor_flex.dense_forward.default)(
        query, key, value, *mask_args, *scale_args(scale),
        *_mod_args(score_mod, score_mod_other_buffers, is_identity_score_mod(score_mod)),
        *_mod_args(mask_mod, mask_mod_other_buffers))
    return out, lse, max_scores


def lower_backward_extern(query, key, value, out, logsumexp, grad_out, grad_logsumexp,
                          fw_graph, joint_graph, block_mask, scale, kernel_options,
                          score_mod_other_buffers=(), mask_mod_other_buffers=()):
    """Lower ``inductor_flex_attention_backward`` to ``inductor_flex::dense_backward``."""
    mask_args, mask_mod = _block_mask_args(block_mask)
    needs_grad = _joint_buffers_with_grads(joint_graph, len(score_mod_other_buffers))
    identity = is_identity_score_mod(fw_graph)
    # The identity's score gradient is the incoming gradient: no gradient source either.
    gradient_source, _, _, _, gradient_constants = _mod_args(
        score_gradient_graph(_subgraph_module(joint_graph)), (), identity)
    grad_query, grad_key, grad_value, kept = _fallback(torch.ops.inductor_flex.dense_backward.default)(
        query, key, value, out, logsumexp, grad_out, grad_logsumexp, *mask_args,
        *scale_args(scale), *_mod_args(fw_graph, score_mod_other_buffers, identity),
        gradient_source, gradient_constants,
        *_mod_args(mask_mod, mask_mod_other_buffers), needs_grad)
    kept = iter(kept)
    grad_buffers = tuple(next(kept) if needed else None for needed in needs_grad)
    return grad_query, grad_key, grad_value, grad_buffers


def _joint_buffers_with_grads(joint_graph, num_buffers: int) -> list[bool]:
    wanted = joint_graph_buffer_grads(_subgraph_module(joint_graph), num_buffers)
    if wanted is None:
        raise RuntimeError(
            f"inductor_flex extern fallback: the joint graph must return the score gradient and "
            f"one gradient per score_mod buffer ({1 + num_buffers} values)")
    return wanted
