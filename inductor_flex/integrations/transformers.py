"""Hugging Face transformers: run a model's attention layers through inductor_flex.

    from inductor_flex.integrations.transformers import register
    register()  # once, before loading the model
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="inductor_flex")

transformers asks two hooks of an attention implementation, both keyed by its name:

* a mask builder (``masking_utils.AttentionMaskInterface``), called once per forward and
  mask kind (full / sliding) with the model's mask function (causal, sliding window,
  packed-sequence remapping already folded in), the 2D padding mask and the cache offsets;
  ours turns them into a :class:`~inductor_flex.BlockMask`;
* an attention function (``AttentionInterface``), called by every attention layer with
  ``[B, H, L, E]`` query / key / value and the mask the builder made; ours calls
  :func:`~inductor_flex.flex_attention`, with Gemma 2's soft-capping as a score_mod and
  GPT-OSS's learned sinks folded in afterwards through the log-sum-exp.

transformers is imported only inside :func:`register`.
"""
from typing import Callable, Optional, Tuple

import torch
from torch import Tensor

from ..api import AuxRequest, flex_attention
from ..block_mask import BlockMask, and_masks, create_block_mask, noop_mask
from ..masks import generate_tanh_softcap

__all__ = ["attention_forward", "block_mask_for", "register"]


def register(name: str = "inductor_flex") -> str:
    """Register our attention function and mask builder under ``name`` with transformers, so
    that ``attn_implementation=name`` selects them. Returns ``name``."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(name, attention_forward)
    AttentionMaskInterface.register(name, block_mask_for)
    return name


def _keeps_unpadded_keys(padding: Tensor) -> Callable:
    def keeps_unpadded_keys(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return padding[b, kv_idx]

    return keeps_unpadded_keys


def _shifted(mask_mod: Callable, q_offset, kv_offset, q_length: int, kv_length: int, device) -> Callable:
    # transformers' mask functions speak absolute positions; a BlockMask indexes from 0 the
    # queries and keys it is given (the new tokens, the cached window). The positions are
    # looked up rather than added inside the mask: under torch.compile the offsets are
    # SymInts, which vmap cannot add to its indices (and a tensor made of one would pin
    # its value, recompiling at every decoding step).
    q_positions = torch.arange(q_length, device=device) + q_offset
    kv_positions = torch.arange(kv_length, device=device) + kv_offset

    def shifted(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return mask_mod(b, h, q_positions[q_idx], kv_positions[kv_idx])

    return shifted


def block_mask_for(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset=0,
    kv_offset=0,
    mask_function: Optional[Callable] = None,
    attention_mask: Optional[Tensor] = None,
    device="cpu",
    **ignored,
) -> BlockMask:
    """The BlockMask transformers' mask builders ask for: ``mask_function`` (absolute
    positions) and, where given, the 2D ``attention_mask`` (False: a padding token, in
    absolute key positions), over ``q_length`` queries starting at ``q_offset`` and
    ``kv_length`` keys starting at ``kv_offset``."""
    mask_mod = noop_mask if mask_function is None else mask_function
    if attention_mask is not None:
        # Keys past the 2D mask are cache slots not written yet (static caches): masked.
        missing = kv_offset + kv_length - attention_mask.shape[-1]
        padding = torch.nn.functional.pad(attention_mask.bool(), (0, max(missing, 0)), value=False)
        mask_mod = and_masks(mask_mod, _keeps_unpadded_keys(padding))
    if not (isinstance(q_offset, int) and isinstance(kv_offset, int) and q_offset == kv_offset == 0):
        mask_mod = _shifted(mask_mod, q_offset, kv_offset, q_length, kv_length, device)
    return create_block_mask(mask_mod, batch_size, None, q_length, kv_length, device=device)


def attention_forward(
    module: torch.nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Optional[BlockMask],
    scaling: Optional[float] = None,
    dropout: float = 0.0,
    softcap: Optional[float] = None,
    s_aux: Optional[Tensor] = None,
    **ignored,
) -> Tuple[Tensor, Tensor]:
    """One attention layer for transformers: ``[B, H, L, E]`` inputs, returns the output as
    ``[B, L, H, Ev]`` and, in the attention-weights slot, each query's log-sum-exp of its
    scores (``[B, H, L]``, in the value dtype), as transformers' own flex integration does:
    the weights themselves are never materialized.

    ``softcap`` (Gemma 2) caps the scaled scores inside the kernel; ``s_aux`` (GPT-OSS) is
    one learned sink logit per head that takes part in each row's softmax and then is
    dropped, i.e. the output shrinks by ``exp(lse) / (exp(lse) + exp(sink))``.
    """
    if dropout:
        raise NotImplementedError("inductor_flex attention has no dropout; use model.eval() or "
                                  "set the config's attention_dropout to 0")
    if attention_mask is not None and not isinstance(attention_mask, BlockMask):
        raise TypeError(
            f"inductor_flex attention takes the BlockMask its mask builder makes; got "
            f"{type(attention_mask).__name__} (pass the usual 2D attention_mask to the model "
            f"rather than a prepared 4D mask)")
    score_mod = generate_tanh_softcap(softcap) if softcap else None
    outputs = flex_attention(
        query, key, value,
        score_mod=score_mod,
        block_mask=attention_mask,
        scale=scaling,
        enable_gqa=query.shape[1] != key.shape[1],
        kernel_options=ignored.get("kernel_options"),
        return_aux=AuxRequest(lse=True),
    )
    output, aux = outputs
    if s_aux is not None:
        # exp(lse) / (exp(lse) + exp(sink)) = sigmoid(lse - sink); a row that keeps nothing
        # has lse = -inf and stays zero.
        kept_share = torch.sigmoid(aux.lse - s_aux.float().view(1, -1, 1))
        output = (output * kept_share.unsqueeze(-1)).to(query.dtype)
    return output.transpose(1, 2).contiguous(), aux.lse.to(value.dtype)
