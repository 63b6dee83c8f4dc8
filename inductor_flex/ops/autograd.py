"""The autograd rule of ``inductor_flex_attention``.

The forward operator's ``Autograd`` kernel wraps the call in ``FlexAttentionFunction``: the
forward runs the operator below autograd and saves query, key, value, out, lse, the block
mask tensors and the buffers; the backward calls ``inductor_flex_attention_backward`` with

- ``fw_graph``: the score_mod itself, and
- ``joint_graph``: ``(score, b, h, q_idx, kv_idx, grad_score_out, *buffers) ->
  (grad_score, *grad_buffers)`` (``None`` for a buffer that does not require grad): under
  a tracer, a graph made by tracing ``torch.autograd.grad`` of one score_mod call on 0-d
  examples with ``make_fx`` (so a custom ``autograd.Function`` inside the mod keeps its
  backward, which a traced fw_graph loses); in eager mode the same function untraced (the
  dense backward then differentiates the user's score_mod itself, custom rules included,
  and only asks the joint which buffers get grads).

Gradients of captured tensors. Under torch.compile, Dynamo lifts the tensors a score_mod
closes over into ``score_mod_other_buffers``, so they arrive here as inputs. In eager code
the mod closes over them and the buffers are empty; a closed-over tensor that requires grad
would be invisible to this Function. So in eager mode, when grad is on and the score_mod's
output on 0-d examples requires grad although its score does not, the mod is traced once
with ``make_fx`` (real tensors, cheap 0-d work) and every closed-over tensor that requires
grad is turned from a graph constant into a trailing input: the traced graph becomes the
score_mod and those tensors become explicit buffers. One path then serves both modes, and
memory stays that of the chunked backward operator. (Known limit: that trace records only
forward ops, so a custom ``autograd.Function`` inside such a mod is differentiated by its
forward's derivative in eager mode; under torch.compile its own backward is used.)

Buffers may also be ints or SymInts (sizes a mod reads under dynamic shapes); they are
carried along and never get gradients.

lse is differentiable (its gradient reaches the backward operator as ``grad_logsumexp``,
``None`` when lse did not reach the loss); max_scores is not. Differentiating the
gradients again fails with a clear error (see ``backward.py``).
"""
import copy
import functools
import types
from contextlib import nullcontext
from typing import Callable, Sequence

import torch
from torch import Tensor
from torch._C import DispatchKey
from torch._dispatch.python import suspend_functionalization
from torch._guards import detect_fake_mode
from torch._higher_order_ops.utils import _from_fun
from torch._subclasses.fake_tensor import FakeTensor
from torch._subclasses.functional_tensor import FunctionalTensor, disable_functional_mode
from torch.fx.experimental.proxy_tensor import disable_proxy_modes_tracing, make_fx

from .backward import inductor_flex_attention_backward
from inductor_flex._indexing import index_with_tensors

from ._shared import mod_example_args
from .forward import inductor_flex_attention


def _is_traced(tensors: Sequence[Tensor]) -> bool:
    """True inside a tracer: fake or functional tensors, or a make_fx session running."""
    if torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.PROXY) is not None:
        return True
    return any(isinstance(t, (FakeTensor, FunctionalTensor)) or torch._is_functional_tensor(t)
               for t in tensors)


# ---------------------------------------------------------------------------------------
# Eager: closed-over tensors that require grad become explicit buffers
# ---------------------------------------------------------------------------------------

def _grad_requiring_constants(graph: torch.fx.GraphModule) -> list[torch.fx.Node]:
    nodes = []
    for node in graph.graph.nodes:
        if node.op == "get_attr":
            value = getattr(graph, node.target, None)
            if isinstance(value, Tensor) and value.requires_grad:
                nodes.append(node)
    return nodes


def lift_grad_requiring_constants(graph: torch.fx.GraphModule) -> tuple[torch.fx.GraphModule, list[Tensor]]:
    """Turn the tensor constants of ``graph`` that require grad into trailing placeholders.

    Returns the rewritten graph and the tensors, in placeholder order.
    """
    constants = _grad_requiring_constants(graph)
    if not constants:
        return graph, []
    placeholders = [n for n in graph.graph.nodes if n.op == "placeholder"]
    lifted = []
    insert_after = placeholders[-1]
    for i, node in enumerate(constants):
        tensor = getattr(graph, node.target)
        with graph.graph.inserting_after(insert_after):
            placeholder = graph.graph.placeholder(f"lifted_buffer_{i}")
        placeholder.meta.update(node.meta)
        node.replace_all_uses_with(placeholder)
        graph.graph.erase_node(node)
        insert_after = placeholder
        lifted.append(tensor)
    graph.graph.lint()
    graph.recompile()
    return graph, lifted


# What a plain function may reach without holding a tensor that requires grad.
_INERT_TYPES = (type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device,
                torch._ops.OpOverload, torch._ops.OpOverloadPacket)
_MAX_REACH_DEPTH = 4
_MAX_CONTAINER_ITEMS = 64


def _may_reach_grad_tensor(value, depth: int = 0) -> bool:
    """False when ``value`` provably reaches no tensor that requires grad: a tensor that
    does not, an inert value, a small container of those, or a plain function whose
    closure, defaults and the globals it names are such. True whenever unsure."""
    if isinstance(value, Tensor):
        return value.requires_grad
    if isinstance(value, _INERT_TYPES):
        return False
    if isinstance(value, type):
        # A class reached by name: its own attributes may hold a learned tensor (Cfg.bias).
        return any((isinstance(v, Tensor) and v.requires_grad) or isinstance(v, torch.nn.Module)
                   for v in vars(value).values())
    if isinstance(value, types.BuiltinFunctionType):
        # torch.exp and friends are bound to a module or a class; bias.mul to its tensor.
        owner = getattr(value, "__self__", None)
        if owner is None or isinstance(owner, (types.ModuleType, type)):
            return False
        return _may_reach_grad_tensor(owner, depth + 1)
    if depth >= _MAX_REACH_DEPTH:
        return True
    if isinstance(value, torch.nn.Module):
        return any(t.requires_grad for t in (*value.parameters(), *value.buffers()))
    if isinstance(value, (list, tuple, set, frozenset, dict)):
        items = list(value.values()) if isinstance(value, dict) else list(value)
        return len(items) > _MAX_CONTAINER_ITEMS or any(_may_reach_grad_tensor(v, depth + 1) for v in items)
    if isinstance(value, functools.partial):
        return any(_may_reach_grad_tensor(v, depth + 1)
                   for v in (value.func, value.args, value.keywords))
    if isinstance(value, types.MethodType):
        return _may_reach_grad_tensor(value.__self__, depth + 1) or _may_reach_grad_tensor(value.__func__, depth + 1)
    if not isinstance(value, types.FunctionType):
        return True  # a callable object, say: its state is not ours to walk
    names = set()
    codes = [value.__code__]
    while codes:  # the function's own names and those of functions defined inside it
        code = codes.pop()
        names.update(code.co_names)
        codes.extend(c for c in code.co_consts if isinstance(c, types.CodeType))
    reached = [cell.cell_contents for cell in (value.__closure__ or ()) if _cell_is_set(cell)]
    reached += list(value.__defaults__ or ()) + list((value.__kwdefaults__ or {}).values())
    for name in names & value.__globals__.keys():
        found = value.__globals__[name]
        if isinstance(found, types.ModuleType):
            # A module reached by name: only the attributes the code names matter.
            reached += [getattr(found, n, None) for n in names]
        else:
            reached.append(found)
    return any(_may_reach_grad_tensor(v, depth + 1) for v in reached if not isinstance(v, types.ModuleType))


def _cell_is_set(cell) -> bool:
    try:
        cell.cell_contents
    except ValueError:  # a closure variable not assigned yet
        return False
    return True


def _closure_needs_grad(score_mod: Callable, query: Tensor, buffers: Sequence[Tensor]) -> bool:
    """Whether a score_mod closes over a tensor that requires grad (eager tensors only).

    Decided without calling the mod when it provably reaches no such tensor (the common
    case), so a mod runs once per use; otherwise by one call on 0-d examples.
    """
    if isinstance(score_mod, torch.fx.GraphModule):
        return bool(_grad_requiring_constants(score_mod))
    if not _may_reach_grad_tensor(score_mod):
        return False
    with torch.enable_grad(), index_with_tensors():
        detached = [b.detach() if isinstance(b, Tensor) else b for b in buffers]
        result = score_mod(*mod_example_args(query), *detached)
    return isinstance(result, Tensor) and result.requires_grad


def expose_captured_grad_tensors(score_mod: Callable, query: Tensor,
                                 buffers: tuple) -> tuple[Callable, tuple]:
    """In eager mode, make the tensors ``score_mod`` closes over that require grad explicit.

    Returns ``(score_mod, buffers)`` unchanged when there is nothing to do, else a traced
    score_mod taking the extra tensors after ``buffers`` and the extended buffer tuple.
    """
    if (_is_traced([query, *[b for b in buffers if isinstance(b, Tensor)]])
            or not _closure_needs_grad(score_mod, query, buffers)):
        return score_mod, buffers
    if isinstance(score_mod, torch.fx.GraphModule):
        # Edit a copy of the graph; the constants stay shared with the user's module.
        graph = torch.fx.GraphModule(score_mod, copy.deepcopy(score_mod.graph))
    else:
        with index_with_tensors():
            graph = make_fx(score_mod, tracing_mode="real")(
                *mod_example_args(query), *[b.detach() if isinstance(b, Tensor) else b for b in buffers])
    graph, lifted = lift_grad_requiring_constants(graph)
    return graph, tuple(buffers) + tuple(lifted)


# ---------------------------------------------------------------------------------------
# The joint graph
# ---------------------------------------------------------------------------------------

def joint_function(score_mod: Callable, needs_grad: Sequence[bool]) -> Callable:
    """The joint of ``score_mod`` as a plain function (see ``build_joint_graph``)."""
    def joint(score, b, h, q_idx, kv_idx, grad_score_out, *buffers):
        with torch.enable_grad():
            score_out = score_mod(score, b, h, q_idx, kv_idx, *buffers)
        wrt = [score] + [buf for buf, need in zip(buffers, needs_grad) if need]
        if isinstance(score_out, Tensor) and score_out.requires_grad:
            grads = torch.autograd.grad(score_out, wrt, grad_score_out, allow_unused=True)
        else:  # the score_mod ignores the score and every buffer
            grads = [None] * len(wrt)
        grads = [torch.zeros_like(t) if g is None else g for g, t in zip(grads, wrt)]
        buffer_grads = iter(grads[1:])
        return (grads[0], *[next(buffer_grads) if need else None for need in needs_grad])

    return joint


def build_joint_graph(score_mod: Callable, query: Tensor, buffers: Sequence[Tensor],
                      needs_grad: Sequence[bool]) -> torch.fx.GraphModule:
    """``make_fx`` graph of ``(score, b, h, q_idx, kv_idx, grad_score_out, *buffers) ->
    (grad_score, *grad_buffers)`` for ``score_mod``; ``None`` where ``needs_grad`` is False.

    Traced on its own (outside any enclosing tracer or functionalization) so that the
    result is a plain graph of ATen ops; fake tensors are used when the inputs are fake.
    """
    fake_mode = detect_fake_mode((query, *[b for b in buffers if isinstance(b, Tensor)]))
    with suspend_functionalization(), disable_functional_mode(), disable_proxy_modes_tracing():
        with fake_mode if fake_mode is not None else nullcontext():
            # Eager: alias the real buffers, no copy. Ints and SymInts pass as they are.
            copy_buffer = (lambda b: b.detach()) if fake_mode is None else _from_fun
            example_buffers = [copy_buffer(b).requires_grad_(need) if isinstance(b, Tensor) else b
                               for b, need in zip(buffers, needs_grad)]
            score = torch.zeros((), dtype=query.dtype, device=query.device, requires_grad=True)
            indices = [torch.zeros((), dtype=torch.int32, device=query.device) for _ in range(4)]
            grad_score_out = torch.zeros((), dtype=query.dtype, device=query.device)
        with index_with_tensors(), fake_mode if fake_mode is not None else nullcontext():
            return make_fx(joint_function(score_mod, needs_grad), tracing_mode="real")(
                score, *indices, grad_score_out, *example_buffers)


# ---------------------------------------------------------------------------------------
# The autograd.Function
# ---------------------------------------------------------------------------------------

def _save_mixed(ctx, *groups: Sequence) -> None:
    """Save groups of values of any kind: tensors through save_for_backward (as autograd
    requires), everything else (ints, SymInts, None, the mask_mod) on ctx."""
    flat = [value for group in groups for value in group]
    ctx.save_for_backward(*[v for v in flat if isinstance(v, Tensor)])
    ctx.saved_template = [None if isinstance(v, Tensor) else v for v in flat]
    ctx.saved_is_tensor = [isinstance(v, Tensor) for v in flat]
    ctx.saved_group_sizes = [len(group) for group in groups]


def _load_mixed(ctx) -> list[list]:
    tensors = iter(ctx.saved_tensors)
    flat = [next(tensors) if is_tensor else value
            for value, is_tensor in zip(ctx.saved_template, ctx.saved_is_tensor)]
    groups, start = [], 0
    for size in ctx.saved_group_sizes:
        groups.append(flat[start:start + size])
        start += size
    return groups


class FlexAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, query, key, value, score_mod, joint_graph, block_mask, scale, kernel_options,
                mask_mod_other_buffers, *score_mod_other_buffers):
        with torch._C._AutoDispatchBelowAutograd():
            out, lse, max_scores = inductor_flex_attention(
                query, key, value, score_mod, block_mask, scale, kernel_options,
                score_mod_other_buffers, mask_mod_other_buffers)
        _save_mixed(ctx, (query, key, value, out, lse), block_mask, score_mod_other_buffers,
                    mask_mod_other_buffers)
        ctx.score_mod = score_mod
        ctx.joint_graph = joint_graph
        ctx.scale = scale
        ctx.kernel_options = kernel_options
        ctx.mark_non_differentiable(max_scores)
        ctx.set_materialize_grads(False)
        return out, lse, max_scores

    @staticmethod
    def backward(ctx, grad_out, grad_lse, grad_max_scores):
        (query, key, value, out, lse), block_mask, score_buffers, mask_buffers = _load_mixed(ctx)
        if grad_out is None:  # only lse reached the loss
            grad_out = torch.zeros_like(out)
        grad_query, grad_key, grad_value, grad_buffers = inductor_flex_attention_backward(
            query, key, value, out, lse, grad_out, grad_lse, ctx.score_mod, ctx.joint_graph,
            tuple(block_mask), ctx.scale, ctx.kernel_options, tuple(score_buffers),
            tuple(mask_buffers))
        # score_mod, joint_graph, block_mask, scale, kernel_options, mask buffers: no grads.
        return (grad_query, grad_key, grad_value, None, None, None, None, None, None,
                *grad_buffers)


@inductor_flex_attention.py_impl(DispatchKey.Autograd)
def _forward_autograd(query, key, value, score_mod, block_mask, scale, kernel_options,
                      score_mod_other_buffers=(), mask_mod_other_buffers=()):
    score_mod_other_buffers = tuple(score_mod_other_buffers)
    if torch.is_grad_enabled():
        score_mod, score_mod_other_buffers = expose_captured_grad_tensors(
            score_mod, query, score_mod_other_buffers)
    differentiable = [t for t in (query, key, value, *score_mod_other_buffers) if isinstance(t, Tensor)]
    if not (torch.is_grad_enabled() and any(t.requires_grad for t in differentiable)):
        with torch._C._AutoDispatchBelowAutograd():
            return inductor_flex_attention(query, key, value, score_mod, block_mask, scale,
                                           kernel_options, score_mod_other_buffers,
                                           mask_mod_other_buffers)
    # Buffers may also be ints or SymInts (sizes a mod read); those never need grads.
    needs_grad = [isinstance(t, Tensor) and t.requires_grad for t in score_mod_other_buffers]
    if _is_traced(differentiable):
        joint_graph = build_joint_graph(score_mod, query, score_mod_other_buffers, needs_grad)
    else:
        # Eager: the dense backward needs no graph, and tracing one costs more than a small
        # attention call; the plain function has the same signature and results.
        joint_graph = joint_function(score_mod, needs_grad)
    # The backward needs lse even when the caller did not ask for it.
    kernel_options = {**(kernel_options or {}), "OUTPUT_LOGSUMEXP": True}
    return FlexAttentionFunction.apply(query, key, value, score_mod, joint_graph, tuple(block_mask),
                                       scale, kernel_options, tuple(mask_mod_other_buffers),
                                       *score_mod_other_buffers)
