"""The forward operator: ``torch.ops.higher_order.inductor_flex_attention``.

Argument order (docs/internals.md): query, key, value, score_mod, block_mask, scale,
kernel_options, score_mod_other_buffers, mask_mod_other_buffers -> (out, lse, max_scores).

Registrations made here:

- ``CompositeExplicitAutograd``: the exact chunked dense implementation (``dense.py``).
- fake: shapes, dtypes and strides, computed without running anything.
- ``ProxyTorchDispatchMode``: the mods become submodules of the traced graph (traced on
  0-d example arguments with the tracer's own decomposition table) and the operator one
  ``call_function`` node.
- functionalization: refuses mods that mutate their arguments or buffers, then redispatches.
- autocast: inputs are cast to the autocast dtype, as scaled_dot_product_attention does.

The autograd rule lives in ``autograd.py``. The small tracing helpers below
(``mod_example_args``, ``trace_mod_into``) are shared with the backward operator and the
autograd rule; mods are traced under ``inductor_flex._indexing.index_with_tensors``.
"""
from typing import Any, Callable, Sequence

import torch
import torch.utils._pytree as pytree
from torch import Tensor
from torch._C import DispatchKey
from torch._higher_order_ops.utils import (
    UnsupportedAliasMutationException,
    _has_potential_branch_input_mutation,
    reenter_make_fx,
    register_fake,
    unique_graph_id,
)
from torch._ops import HigherOrderOperator
from torch.fx.experimental.proxy_tensor import ProxyTorchDispatchMode, track_tensor_tree

from inductor_flex._indexing import index_with_tensors


class InductorFlexAttention(HigherOrderOperator):
    def __init__(self) -> None:
        super().__init__("inductor_flex_attention")

    # After a graph break Dynamo would otherwise trace into the eager implementation
    # (dense math, autograd rule); compiled code reaches the operator through its
    # capture rule instead, which does not go through this method.
    @torch._disable_dynamo(recursive=True)
    def __call__(self, query, key, value, score_mod, block_mask, scale, kernel_options,
                 score_mod_other_buffers=(), mask_mod_other_buffers=()):
        return super().__call__(query, key, value, score_mod, block_mask, scale, kernel_options,
                                tuple(score_mod_other_buffers), tuple(mask_mod_other_buffers))


inductor_flex_attention = InductorFlexAttention()

# Names of the submodules the proxy registration adds to a traced graph.
SCORE_MOD_PREFIX = "flex_score_mod"
MASK_MOD_PREFIX = "flex_mask_mod"


# ---------------------------------------------------------------------------------------
# Shared helpers
# ---------------------------------------------------------------------------------------

def empty_in_layout_of(like: Tensor, shape: Sequence, dtype: torch.dtype | None = None) -> Tensor:
    """An empty tensor of ``shape`` whose dims are laid out in the memory order of ``like``.

    ``shape`` has ``like``'s rank; only sizes may differ (an output with another head dim,
    say). The innermost dim of ``like`` (smallest stride; ties go to the later dim, as in a
    contiguous tensor) is innermost in the result, and so on outwards, densely packed.
    """
    ndim = like.dim()
    if len(shape) != ndim:
        raise ValueError(f"empty_in_layout_of: shape {tuple(shape)} must have rank {ndim}")
    strides = like.stride()
    # Innermost first. Python's sort is stable, so among equal strides the later dim,
    # listed first after the reversal, stays inner.
    fill_order = sorted(reversed(range(ndim)), key=lambda d: strides[d])
    new_strides = [0] * ndim
    running = 1
    for d in fill_order:
        new_strides[d] = running
        running = running * shape[d]
    return like.new_empty_strided(tuple(shape), tuple(new_strides),
                                  dtype=like.dtype if dtype is None else dtype)


def mod_example_args(query: Tensor, with_score: bool = True) -> list[Tensor]:
    """0-d example arguments of a mod: a score in the query's dtype (if ``with_score``),
    then int32 ``b, h, q_idx, kv_idx``, all on the query's device."""
    indices = [query.new_zeros((), dtype=torch.int32) for _ in range(4)]
    return ([query.new_zeros(())] if with_score else []) + indices


def trace_mod_into(mode: ProxyTorchDispatchMode, mod: Callable, example_args: Sequence[Any],
                   prefix: str) -> tuple[str, torch.fx.GraphModule]:
    """Trace ``mod`` inside the running make_fx session (same decompositions, same fake
    mode) and register it on the traced root under a fresh ``prefix_N`` name."""
    with index_with_tensors():
        graph = reenter_make_fx(mod)(*example_args)
    _, name = unique_graph_id(mode, prefix)
    mode.tracer.root.register_module(name, graph)
    return name, graph


def trace_mods_into(mode: ProxyTorchDispatchMode, query: Tensor, score_mod: Callable,
                    score_prefix: str, block_mask: tuple, score_mod_other_buffers: Sequence[Any],
                    mask_mod_other_buffers: Sequence[Any]) -> tuple[torch.fx.GraphModule, tuple]:
    """Trace a score_mod and the block mask's mask_mod into the running make_fx session;
    returns the score graph and the block mask tuple carrying the mask graph."""
    _, score_graph = trace_mod_into(mode, score_mod,
                                    mod_example_args(query) + list(score_mod_other_buffers),
                                    score_prefix)
    _, mask_graph = trace_mod_into(mode, block_mask[-1],
                                   mod_example_args(query, with_score=False) + list(mask_mod_other_buffers),
                                   MASK_MOD_PREFIX)
    return score_graph, replace_mask_mod(block_mask, mask_graph)


def check_mod_is_pure(mod: Callable, mod_name: str, example_args: Sequence[Any], pre_dispatch: bool) -> None:
    """Raise when ``mod`` writes to its arguments (the indices, score or captured buffers).

    A mod runs once per (b, h, q, kv) in any order, so an in-place update of a shared
    tensor has no meaning we could reproduce.
    """
    with index_with_tensors():
        mutates = _has_potential_branch_input_mutation(mod, list(example_args), pre_dispatch)
    if mutates:
        raise UnsupportedAliasMutationException(
            f"inductor_flex_attention: {mod_name} mutates one of its inputs or captured buffers "
            f"in place; {mod_name} must be a pure function of its arguments")


def replace_mask_mod(block_mask: tuple, mask_mod: Callable) -> tuple:
    """The block mask tuple with its last element (the mask_mod) replaced."""
    return tuple(block_mask[:-1]) + (mask_mod,)


def functionalize_mod(ctx, mod: Callable) -> Callable:
    """``ctx.functionalize(mod)``, with tensor indexing routed through ``aten.index``.

    Under functionalization the indices are functional wrappers, which plain indexing
    would read with ``.item()``; routing keeps ``bias[h]`` working under vmap as well.
    """
    functional = ctx.functionalize(mod)

    def run(*args):
        with index_with_tensors():
            return functional(*args)

    return run


def _is_functionalizing_pre_dispatch(ctx) -> bool:
    return bool(getattr(getattr(ctx, "mode", None), "pre_dispatch", False))


# ---------------------------------------------------------------------------------------
# Registrations
# ---------------------------------------------------------------------------------------

@inductor_flex_attention.py_impl(DispatchKey.CompositeExplicitAutograd)
def _forward_dense(query, key, value, score_mod, block_mask, scale, kernel_options,
                   score_mod_other_buffers=(), mask_mod_other_buffers=()):
    from .dense import dense_attention

    return dense_attention(query, key, value, score_mod, block_mask, scale,
                           score_mod_other_buffers, mask_mod_other_buffers)


@register_fake(inductor_flex_attention)
def _forward_fake(query, key, value, score_mod, block_mask, scale, kernel_options,
                  score_mod_other_buffers=(), mask_mod_other_buffers=()):
    batch, heads, q_len, _ = query.shape
    out = empty_in_layout_of(query, (batch, heads, q_len, value.shape[-1]))
    lse = query.new_empty((batch, heads, q_len), dtype=torch.float32)
    max_scores = query.new_empty((batch, heads, q_len), dtype=torch.float32)
    return out, lse, max_scores


@inductor_flex_attention.py_impl(ProxyTorchDispatchMode)
def _forward_proxy(mode, query, key, value, score_mod, block_mask, scale, kernel_options,
                   score_mod_other_buffers=(), mask_mod_other_buffers=()):
    # The mode is popped while we run, so this call reaches the fake (or real) impl.
    example_out = inductor_flex_attention(query, key, value, score_mod, block_mask, scale,
                                          kernel_options, score_mod_other_buffers,
                                          mask_mod_other_buffers)
    score_graph, block_mask = trace_mods_into(mode, query, score_mod, SCORE_MOD_PREFIX, block_mask,
                                              score_mod_other_buffers, mask_mod_other_buffers)
    node_args = (query, key, value, score_graph, block_mask, scale,
                 kernel_options, tuple(score_mod_other_buffers), tuple(mask_mod_other_buffers))
    proxy_args = pytree.tree_map(mode.tracer.unwrap_proxy, node_args)
    out_proxy = mode.tracer.create_proxy("call_function", inductor_flex_attention, proxy_args, {},
                                         name="inductor_flex_attention")
    return track_tensor_tree(example_out, out_proxy, constant=None, tracer=mode.tracer)


def unwrap_and_check_mods(ctx, query, score_mod, block_mask, score_mod_other_buffers,
                          mask_mod_other_buffers):
    """Functionalization's common first step for both operators: unwrap the block mask and
    the buffers, and refuse a score_mod / mask_mod that writes to its arguments."""
    block_mask = ctx.unwrap_tensors(tuple(block_mask))
    score_mod_other_buffers = ctx.unwrap_tensors(tuple(score_mod_other_buffers))
    mask_mod_other_buffers = ctx.unwrap_tensors(tuple(mask_mod_other_buffers))
    with ctx.redispatch_to_next():
        pre_dispatch = _is_functionalizing_pre_dispatch(ctx)
        check_mod_is_pure(score_mod, "score_mod",
                          mod_example_args(query) + list(score_mod_other_buffers), pre_dispatch)
        check_mod_is_pure(block_mask[-1], "mask_mod",
                          mod_example_args(query, with_score=False) + list(mask_mod_other_buffers),
                          pre_dispatch)
    return block_mask, score_mod_other_buffers, mask_mod_other_buffers


@inductor_flex_attention.py_functionalize_impl
def _forward_functionalize(ctx, query, key, value, score_mod, block_mask, scale, kernel_options,
                           score_mod_other_buffers=(), mask_mod_other_buffers=()):
    query, key, value = ctx.unwrap_tensors((query, key, value))
    block_mask, score_mod_other_buffers, mask_mod_other_buffers = unwrap_and_check_mods(
        ctx, query, score_mod, block_mask, score_mod_other_buffers, mask_mod_other_buffers)
    mask_mod = block_mask[-1]
    with ctx.redispatch_to_next():
        outputs = inductor_flex_attention(
            query, key, value, functionalize_mod(ctx, score_mod),
            replace_mask_mod(block_mask, functionalize_mod(ctx, mask_mod)), scale, kernel_options,
            score_mod_other_buffers, mask_mod_other_buffers)
    return ctx.wrap_tensors(outputs)


def _forward_autocast(device_type: str):
    def impl(query, key, value, score_mod, block_mask, scale, kernel_options,
             score_mod_other_buffers=(), mask_mod_other_buffers=()):
        # Like scaled_dot_product_attention: q, k, v go to the autocast dtype (float64 is
        # left alone, as autocast does); the mods and buffers are untouched.
        target = torch.get_autocast_dtype(device_type)

        def cast(t: Tensor) -> Tensor:
            eligible = t.dtype in (torch.float32, torch.float16, torch.bfloat16)
            return t.to(target) if eligible and t.dtype != target else t

        with torch._C._ExcludeDispatchKeyGuard(
                torch._C.DispatchKeySet(_AUTOCAST_KEYS[device_type])):
            return inductor_flex_attention(cast(query), cast(key), cast(value), score_mod,
                                           block_mask, scale, kernel_options,
                                           score_mod_other_buffers, mask_mod_other_buffers)
    return impl


_AUTOCAST_KEYS = {"cuda": DispatchKey.AutocastCUDA, "cpu": DispatchKey.AutocastCPU}
for _device_type, _key in _AUTOCAST_KEYS.items():
    inductor_flex_attention.py_impl(_key)(_forward_autocast(_device_type))
