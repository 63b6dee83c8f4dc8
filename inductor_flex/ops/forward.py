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

The autograd rule lives in ``autograd.py``. The tracing helpers (``mod_example_args``,
``trace_mod_into``, ...) live in ``_shared.py``, with the backward operator and the autograd
rule; mods are traced under ``inductor_flex._indexing.index_with_tensors``.
"""
import torch
import torch.utils._pytree as pytree
from torch import Tensor
from torch._C import DispatchKey
from torch._higher_order_ops.utils import register_fake
from torch._ops import HigherOrderOperator
from torch.fx.experimental.proxy_tensor import ProxyTorchDispatchMode, track_tensor_tree

from .._block_lists import OperatorBlockMask
from .._compat import redirect_to_checkpoint_modes
from ._shared import (
    SCORE_MOD_PREFIX,
    empty_in_layout_of,
    functionalize_mod,
    replace_mask_mod,
    trace_mods_into,
    unwrap_and_check_mods,
)


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


@inductor_flex_attention.py_functionalize_impl
def _forward_functionalize(ctx, query, key, value, score_mod, block_mask, scale, kernel_options,
                           score_mod_other_buffers=(), mask_mod_other_buffers=()):
    query, key, value = ctx.unwrap_tensors((query, key, value))
    block_mask, score_mod_other_buffers, mask_mod_other_buffers = unwrap_and_check_mods(
        ctx, query, score_mod, block_mask, score_mod_other_buffers, mask_mod_other_buffers)
    mask_mod = OperatorBlockMask(*block_mask).mask_mod
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

redirect_to_checkpoint_modes(inductor_flex_attention)
