"""The backward operator: ``torch.ops.higher_order.inductor_flex_attention_backward``.

Argument order (docs/internals.md): query, key, value, out, logsumexp, grad_out,
grad_logsumexp, fw_graph, joint_graph, block_mask, scale, kernel_options,
score_mod_other_buffers, mask_mod_other_buffers
-> (grad_query, grad_key, grad_value, grad_score_mod_buffers).

Registrations: dense (``dense.py``; when joint_graph is a traced graph, the score gradient
is taken from it, see ``with_score_gradient``), fake, ``ProxyTorchDispatchMode`` (fw_graph,
joint_graph and mask_mod become submodules), functionalization, and an autograd rule that
lets the gradients be computed but makes differentiating them again fail with a clear
message. Gradients come back in their inputs' memory layouts.
"""
import copy
import weakref
from typing import Callable, Sequence

import torch
import torch.utils._pytree as pytree
from torch import Tensor
from torch._C import DispatchKey
from torch._higher_order_ops.utils import register_fake
from torch._ops import HigherOrderOperator
from torch.fx.experimental.proxy_tensor import ProxyTorchDispatchMode, track_tensor_tree

from inductor_flex._indexing import index_with_tensors
from inductor_flex._mods import batchable, identity_score_mod

from .._block_lists import OperatorBlockMask
from .._compat import redirect_to_checkpoint_modes
from ._shared import (
    empty_in_layout_of,
    functionalize_mod,
    joint_graph_buffer_grads,
    mod_example_args,
    replace_mask_mod,
    trace_mod_into,
    trace_mods_into,
    unwrap_and_check_mods,
)

FW_GRAPH_PREFIX = "flex_bw_score_mod"
JOINT_GRAPH_PREFIX = "flex_bw_joint"

DOUBLE_BACKWARD_MESSAGE = (
    "inductor_flex_attention does not support double backward: its gradients (of query, key, "
    "value and score_mod buffers) cannot be differentiated again. Compute higher-order "
    "derivatives with a reference implementation instead.")


class InductorFlexAttentionBackward(HigherOrderOperator):
    def __init__(self) -> None:
        super().__init__("inductor_flex_attention_backward")

    # After a graph break Dynamo would otherwise trace into the eager implementation
    # (dense math, autograd rule); compiled code reaches the operator through its
    # capture rule instead, which does not go through this method.
    @torch._disable_dynamo(recursive=True)
    def __call__(self, query, key, value, out, logsumexp, grad_out, grad_logsumexp,
                 fw_graph, joint_graph, block_mask, scale, kernel_options,
                 score_mod_other_buffers=(), mask_mod_other_buffers=()):
        return super().__call__(query, key, value, out, logsumexp, grad_out, grad_logsumexp,
                                fw_graph, joint_graph, block_mask, scale, kernel_options,
                                tuple(score_mod_other_buffers), tuple(mask_mod_other_buffers))


inductor_flex_attention_backward = InductorFlexAttentionBackward()


def joint_example_args(query: Tensor) -> list[Tensor]:
    """0-d example arguments of a joint graph, before its buffers: score, b, h, q_idx,
    kv_idx, grad of the score_mod output."""
    return mod_example_args(query) + [query.new_zeros(())]


def buffers_with_grads(joint_graph: Callable, query: Tensor, buffers: Sequence[Tensor]) -> list[bool]:
    """Which score_mod buffers the joint graph returns a gradient for (not ``None``).

    Read off the output node of a graph; any other callable is run on 0-d examples.
    """
    if not buffers:
        return []
    if isinstance(joint_graph, torch.fx.GraphModule):
        wanted = joint_graph_buffer_grads(joint_graph, len(buffers))
        if wanted is not None:
            return wanted
    with index_with_tensors():
        grads = joint_graph(*joint_example_args(query), *buffers)
    grads = tuple(grads)
    if len(grads) != 1 + len(buffers):
        raise RuntimeError(
            f"inductor_flex_attention_backward: joint_graph returned {len(grads)} values; it must "
            f"return the score gradient and one gradient (or None) per score_mod buffer "
            f"({1 + len(buffers)} in all)")
    return [g is not None for g in grads[1:]]


# ---------------------------------------------------------------------------------------
# The score gradient comes from the joint graph
# ---------------------------------------------------------------------------------------
# The dense backward differentiates the score_mod it is given. Under a tracer, fw_graph has
# lost any custom backward the user's mod had (an autograd.Function inside it): tracing
# records only forward ops. The joint graph was traced *through* autograd and keeps it.
# So where a joint graph exists, the dense kernel gets a score_mod whose gradient with
# respect to the score is the joint's; buffer gradients still come from differentiating
# fw_graph itself, which the dense kernel does efficiently (one scatter per chunk, where
# evaluating the joint's buffer outputs per position would materialize one buffer-sized
# gradient per position).

_score_gradient_graphs: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def score_gradient_graph(joint_graph: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """The joint graph reduced to its first output, the score gradient (cached)."""
    reduced = _score_gradient_graphs.get(joint_graph)
    if reduced is None:
        graph = copy.deepcopy(joint_graph.graph)
        output = next(n for n in graph.nodes if n.op == "output")
        returned = output.args[0]
        first = returned[0] if isinstance(returned, (tuple, list)) else returned
        output.args = ((first,),)
        # Inductor may have turned the joint's scatter into the buffer gradient in place
        # (index_put_ on a fresh zero tensor); such writes are dead once that output goes.
        graph.eliminate_dead_code(is_impure_node=_writes_to_an_input)
        reduced = torch.fx.GraphModule(joint_graph, graph)
        _score_gradient_graphs[joint_graph] = reduced
    return reduced


def _writes_to_an_input(node: torch.fx.Node) -> bool:
    if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
        return node.is_impure()
    return any(schema_arg.is_write and isinstance(arg, torch.fx.Node) and arg.op == "placeholder"
               for arg, schema_arg in zip(node.args, node.target._schema.arguments))


class _ScoreGradientFrom(torch.autograd.Function):
    """Identity on the score_mod's value; its gradient with respect to the score comes from
    a score-gradient function ``(score, b, h, q_idx, kv_idx, grad, *buffers) -> (grad_score,)``."""

    generate_vmap_rule = True

    @staticmethod
    def forward(value, score, score_gradient, b, h, q_idx, kv_idx, *buffers):
        return value.clone()

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, score, score_gradient, b, h, q_idx, kv_idx, *buffers = inputs
        # Buffers may be ints (sizes a mod read); only tensors can be saved as such.
        ctx.save_for_backward(score, b, h, q_idx, kv_idx,
                              *[t for t in buffers if isinstance(t, Tensor)])
        ctx.buffer_template = [None if isinstance(t, Tensor) else t for t in buffers]
        ctx.score_gradient = score_gradient

    @staticmethod
    def backward(ctx, grad):
        score, b, h, q_idx, kv_idx, *tensors = ctx.saved_tensors
        tensors = iter(tensors)
        buffers = [next(tensors) if t is None else t for t in ctx.buffer_template]
        (grad_score,) = ctx.score_gradient(score, b, h, q_idx, kv_idx, grad, *buffers)
        return (grad, grad_score, None, None, None, None, None) + (None,) * len(buffers)


def with_score_gradient(fw_graph: Callable, score_gradient: Callable) -> Callable:
    """A score_mod computing ``fw_graph`` whose score gradient is ``score_gradient``'s.

    ``score_gradient`` is called as ``(score, b, h, q_idx, kv_idx, grad, *buffers)``; the
    buffers' gradients are those of ``fw_graph``.
    """
    fw_graph, score_gradient = batchable(fw_graph), batchable(score_gradient)

    def score_mod(score, b, h, q_idx, kv_idx, *buffers):
        # The score is detached here, so the score gradient can only arrive through the
        # custom function; the buffers stay attached to fw_graph's own derivative.
        value = fw_graph(score.detach(), b, h, q_idx, kv_idx, *buffers)
        return _ScoreGradientFrom.apply(value, score, score_gradient, b, h, q_idx, kv_idx,
                                        *[t.detach() if isinstance(t, Tensor) else t
                                          for t in buffers])

    return score_mod


@inductor_flex_attention_backward.py_impl(DispatchKey.CompositeExplicitAutograd)
def _backward_dense(query, key, value, out, logsumexp, grad_out, grad_logsumexp, fw_graph,
                    joint_graph, block_mask, scale, kernel_options,
                    score_mod_other_buffers=(), mask_mod_other_buffers=()):
    from .dense import dense_attention_backward

    score_mod = fw_graph
    if isinstance(joint_graph, torch.fx.GraphModule) and fw_graph is not identity_score_mod:
        score_mod = with_score_gradient(fw_graph, score_gradient_graph(joint_graph))
    # The joint graph also says which buffers get a gradient, so this path and the fake
    # one agree.
    grads = dense_attention_backward(
        query, key, value, out, logsumexp, grad_out, grad_logsumexp, score_mod, block_mask,
        scale, score_mod_other_buffers, mask_mod_other_buffers,
        buffers_requiring_grad=buffers_with_grads(joint_graph, query, score_mod_other_buffers))
    return in_layouts_of_inputs(grads, query, key, value, score_mod_other_buffers)


def in_layouts_of_inputs(grads, query, key, value, buffers):
    """The gradients, each in the memory layout of its input (what the fake rule says)."""
    grad_query, grad_key, grad_value, grad_buffers = grads
    return (match_layout(grad_query, query), match_layout(grad_key, key),
            match_layout(grad_value, value),
            tuple(None if g is None else match_layout(g, b) for g, b in zip(grad_buffers, buffers)))


def match_layout(result: Tensor, like: Tensor) -> Tensor:
    """``result`` in ``like``'s memory order (copied only when it differs)."""
    target = empty_in_layout_of(like, result.shape, dtype=result.dtype)
    if result.stride() == target.stride():
        return result
    return target.copy_(result)


@register_fake(inductor_flex_attention_backward)
def _backward_fake(query, key, value, out, logsumexp, grad_out, grad_logsumexp, fw_graph,
                   joint_graph, block_mask, scale, kernel_options,
                   score_mod_other_buffers=(), mask_mod_other_buffers=()):
    grad_query = empty_in_layout_of(query, query.shape)
    grad_key = empty_in_layout_of(key, key.shape)
    grad_value = empty_in_layout_of(value, value.shape)
    has_grad = buffers_with_grads(joint_graph, query, score_mod_other_buffers)
    grad_buffers = tuple(empty_in_layout_of(buf, buf.shape) if needed else None
                         for buf, needed in zip(score_mod_other_buffers, has_grad))
    return grad_query, grad_key, grad_value, grad_buffers


@inductor_flex_attention_backward.py_impl(ProxyTorchDispatchMode)
def _backward_proxy(mode, query, key, value, out, logsumexp, grad_out, grad_logsumexp, fw_graph,
                    joint_graph, block_mask, scale, kernel_options,
                    score_mod_other_buffers=(), mask_mod_other_buffers=()):
    example_out = inductor_flex_attention_backward(
        query, key, value, out, logsumexp, grad_out, grad_logsumexp, fw_graph, joint_graph,
        block_mask, scale, kernel_options, score_mod_other_buffers, mask_mod_other_buffers)
    fw_gm, block_mask = trace_mods_into(mode, query, fw_graph, FW_GRAPH_PREFIX, block_mask,
                                        score_mod_other_buffers, mask_mod_other_buffers)
    _, joint_gm = trace_mod_into(mode, joint_graph,
                                 joint_example_args(query) + list(score_mod_other_buffers),
                                 JOINT_GRAPH_PREFIX)
    node_args = (query, key, value, out, logsumexp, grad_out, grad_logsumexp, fw_gm, joint_gm,
                 block_mask, scale, kernel_options,
                 tuple(score_mod_other_buffers), tuple(mask_mod_other_buffers))
    proxy_args = pytree.tree_map(mode.tracer.unwrap_proxy, node_args)
    out_proxy = mode.tracer.create_proxy("call_function", inductor_flex_attention_backward,
                                         proxy_args, {}, name="inductor_flex_attention_backward")
    return track_tensor_tree(example_out, out_proxy, constant=None, tracer=mode.tracer)


@inductor_flex_attention_backward.py_functionalize_impl
def _backward_functionalize(ctx, query, key, value, out, logsumexp, grad_out, grad_logsumexp,
                            fw_graph, joint_graph, block_mask, scale, kernel_options,
                            score_mod_other_buffers=(), mask_mod_other_buffers=()):
    (query, key, value, out, logsumexp, grad_out, grad_logsumexp) = ctx.unwrap_tensors(
        (query, key, value, out, logsumexp, grad_out, grad_logsumexp))
    block_mask, score_mod_other_buffers, mask_mod_other_buffers = unwrap_and_check_mods(
        ctx, query, fw_graph, block_mask, score_mod_other_buffers, mask_mod_other_buffers)
    mask_mod = OperatorBlockMask(*block_mask).mask_mod
    with ctx.redispatch_to_next():
        # The joint graph may write into tensors it created itself (a zero-filled gradient
        # it scatters into); functionalizing it turns those writes into pure ops.
        grads = inductor_flex_attention_backward(
            query, key, value, out, logsumexp, grad_out, grad_logsumexp,
            functionalize_mod(ctx, fw_graph), functionalize_mod(ctx, joint_graph),
            replace_mask_mod(block_mask, functionalize_mod(ctx, mask_mod)), scale, kernel_options,
            score_mod_other_buffers, mask_mod_other_buffers)
    return ctx.wrap_tensors(grads)


@inductor_flex_attention_backward.py_impl(DispatchKey.Autograd)
def _backward_autograd(*args):
    # Gradients are computed below autograd. When they would themselves be part of a graph
    # (create_graph=True), they get a node that raises on use, so first-order backward with
    # create_graph still works and only a true double backward fails.
    with torch._C._AutoDispatchBelowAutograd():
        grads = inductor_flex_attention_backward(*args)
    tensor_inputs = [t for t in pytree.tree_leaves(args) if isinstance(t, Tensor)]
    if not (torch.is_grad_enabled() and any(t.requires_grad for t in tensor_inputs)):
        return grads
    raise_on_backward = torch._C._functions.DelayedError(DOUBLE_BACKWARD_MESSAGE, 1)

    def guard(t: Tensor) -> Tensor:
        if not (t.is_floating_point() or t.is_complex()):
            return t
        return raise_on_backward(t.detach().requires_grad_(True))

    return pytree.tree_map_only(Tensor, guard, grads)

redirect_to_checkpoint_modes(inductor_flex_attention_backward)
