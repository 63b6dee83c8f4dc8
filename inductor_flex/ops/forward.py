"""The forward operator: ``torch.ops.higher_order.inductor_flex_attention``.

Argument order (docs/internals.md): query, key, value, score_mod, block_mask, scale,
kernel_options, score_mod_other_buffers, mask_mod_other_buffers -> (out, lse, max_scores).
"""
from torch._ops import HigherOrderOperator


class InductorFlexAttention(HigherOrderOperator):
    def __init__(self) -> None:
        super().__init__("inductor_flex_attention")

    def __call__(self, query, key, value, score_mod, block_mask, scale, kernel_options,
                 score_mod_other_buffers=(), mask_mod_other_buffers=()):
        return super().__call__(query, key, value, score_mod, block_mask, scale, kernel_options,
                                tuple(score_mod_other_buffers), tuple(mask_mod_other_buffers))


inductor_flex_attention = InductorFlexAttention()
