"""Ready-made mask_mods and score_mods, one small module per family.

Each ``generate_*`` function returns a mod to pass to ``create_block_mask`` /
``flex_attention``; every module's docstring draws its pattern. ``█`` kept, ``·`` masked.

======================  ==============================================================
module                  constructors
======================  ==============================================================
causal                  causal_mask, generate_causal_mask(offset)
sliding_window          generate_sliding_window_mask(window_size, causal)
prefix_lm               generate_prefix_lm_mask(prefix_length)
document                generate_document_mask(inner, lengths|offsets, causal),
                        document_ids, create_document_block_mask
chunked                 generate_chunked_causal_mask(chunk_size),
                        generate_block_causal_mask(chunk_size)
natten                  generate_natten_mask(height, width, kernel_size)
dilated_sliding_window  generate_dilated_sliding_window_mask(window_size, dilation, causal)
global_tokens           generate_global_sliding_window_mask(num_global, window_size, causal)
alibi                   alibi_slopes(num_heads), generate_alibi_bias(num_heads)   (score_mod)
softcap                 generate_tanh_softcap(soft_cap)                           (score_mod)
relative_position       generate_relative_position_bias(bias_table)               (score_mod)
======================  ==============================================================
"""
from .alibi import alibi_slopes, generate_alibi_bias
from .causal import causal_mask, generate_causal_mask
from .chunked import generate_block_causal_mask, generate_chunked_causal_mask
from .dilated_sliding_window import generate_dilated_sliding_window_mask
from .document import create_document_block_mask, document_ids, generate_document_mask
from .global_tokens import generate_global_sliding_window_mask
from .natten import generate_natten_mask
from .prefix_lm import generate_prefix_lm_mask
from .relative_position import generate_relative_position_bias
from .sliding_window import generate_sliding_window_mask
from .softcap import generate_tanh_softcap

__all__ = [
    "alibi_slopes",
    "causal_mask",
    "create_document_block_mask",
    "document_ids",
    "generate_alibi_bias",
    "generate_block_causal_mask",
    "generate_causal_mask",
    "generate_chunked_causal_mask",
    "generate_dilated_sliding_window_mask",
    "generate_document_mask",
    "generate_global_sliding_window_mask",
    "generate_natten_mask",
    "generate_prefix_lm_mask",
    "generate_relative_position_bias",
    "generate_sliding_window_mask",
    "generate_tanh_softcap",
]
