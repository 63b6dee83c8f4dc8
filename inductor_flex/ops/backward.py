"""The backward operator: ``torch.ops.higher_order.inductor_flex_attention_backward``.

Argument order (docs/internals.md): query, key, value, out, logsumexp, grad_out,
grad_logsumexp, fw_graph, joint_graph, block_mask, scale, kernel_options,
score_mod_other_buffers, mask_mod_other_buffers
-> (grad_query, grad_key, grad_value, grad_score_mod_buffers).
"""
from torch._ops import HigherOrderOperator


class InductorFlexAttentionBackward(HigherOrderOperator):
    def __init__(self) -> None:
        super().__init__("inductor_flex_attention_backward")

    def __call__(self, query, key, value, out, logsumexp, grad_out, grad_logsumexp,
                 fw_graph, joint_graph, block_mask, scale, kernel_options,
                 score_mod_other_buffers=(), mask_mod_other_buffers=()):
        return super().__call__(query, key, value, out, logsumexp, grad_out, grad_logsumexp,
                                fw_graph, joint_graph, block_mask, scale, kernel_options,
                                tuple(score_mod_other_buffers), tuple(mask_mod_other_buffers))


inductor_flex_attention_backward = InductorFlexAttentionBackward()
