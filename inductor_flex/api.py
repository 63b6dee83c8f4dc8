"""``flex_attention``: the public entry point, a drop-in for PyTorch's of the same name.

It checks the inputs (using only shapes, dtypes and devices, so Dynamo traces it), fills
the defaults (scale, identity score_mod, a block mask that keeps everything, the kernel
options) and calls ``torch.ops.higher_order.inductor_flex_attention``. Eager calls run the
operator's exact chunked implementation (``ops/dense.py``); under ``torch.compile`` the
operator becomes a fused kernel.

Debugging mods: in eager mode ``print`` inside a score_mod / mask_mod shows the real values,
but the mods run under ``torch.vmap``, so they print as batched tensors holding the whole
grid. Set ``inductor_flex.api.DEBUG_MODS = True`` (or the environment variable
``INDUCTOR_FLEX_DEBUG_MODS=1`` before import) to have eager calls run each mod once per
position on plain 0-d tensors instead: prints and ``breakpoint()`` then see ordinary
scalars. It is slow (one Python call per position, so keep the sizes small) and
forward-only: backpropagating through a call made in this mode raises. torch.compile
ignores the flag.
"""
import math
import numbers
import os
import warnings
from collections.abc import Mapping
from typing import Callable, NamedTuple, Optional, Tuple, TypedDict, Union

import torch
from torch import Tensor

from . import _compat, _mask_patterns
from ._block_lists import OperatorBlockMask
from ._mods import identity_score_mod
from .block_mask import BlockMask, _DEFAULT_SPARSE_BLOCK_SIZE, noop_mask
from .lowering.options import check_backend
from .ops import inductor_flex_attention

__all__ = ["AuxOutput", "AuxRequest", "FlexKernelOptions", "flex_attention"]

DEBUG_MODS: bool = os.environ.get("INDUCTOR_FLEX_DEBUG_MODS", "0") not in ("", "0")


class FlexKernelOptions(TypedDict, total=False):
    """Tuning knobs for the fused kernels; every key is optional and autotuning picks what is
    left out. A tile knob prefixed ``fwd_`` or ``bwd_`` applies to that pass only
    (``fwd_BLOCK_M``, ``bwd_BLOCK_N1``). Keys are case-insensitive: ``flex_attention``
    upper-cases them before handing them to the operator.
    """

    num_warps: int
    num_stages: int
    BLOCK_M: int
    BLOCK_N: int
    BLOCK_M1: int
    BLOCK_N1: int
    BLOCK_M2: int
    BLOCK_N2: int
    fwd_num_warps: int
    fwd_num_stages: int
    fwd_BLOCK_M: int
    fwd_BLOCK_N: int
    bwd_num_warps: int
    bwd_num_stages: int
    bwd_BLOCK_M1: int
    bwd_BLOCK_N1: int
    bwd_BLOCK_M2: int
    bwd_BLOCK_N2: int
    # Multiply q by scale (and the exp2 base change) once per tile instead of per score.
    PRESCALE_QK: bool
    # Promise that every query row keeps at least one score: skips the empty-row guards.
    ROWS_GUARANTEED_SAFE: bool
    # Promise that each row's listed blocks are consecutive: allows linear block walks.
    BLOCKS_ARE_CONTIGUOUS: bool
    # Accepted for compatibility and ignored: the fused backward always adds buffer
    # gradients in its dK/dV programs (each score once).
    WRITE_DQ: bool
    # Never switch to the short-query (decoding) kernel.
    FORCE_USE_FLEX_ATTENTION: bool
    # Load tiles with the Tensor Memory Accelerator where the GPU has one.
    USE_TMA: bool
    # Backward, full blocks: compute dO v^T before the exponentials (default: per config).
    EARLY_DP: bool
    # Kernel family: "AUTO" (default), "TRITON", "TRITON_DECODE" ("FLASH" is PyTorch's and
    # refused here). An explicit family that cannot serve the call raises, naming why.
    BACKEND: str
    # float16 / bfloat16 kernels: tanh in a score_mod uses the hardware approximation
    # (default True); False keeps the exact libdevice tanh.
    APPROX_TANH: bool
    # Let Triton split the forward's KV loop into producer / consumer warps (default False).
    WARP_SPECIALIZE: bool
    # Short-query (decode) kernel: how many programs share each row's KV blocks (default:
    # enough for four programs per SM).
    SPLIT_KV: int
    # AMD-specific tile knobs: accepted and ignored (no ROCm kernels here).
    kpack: int
    matrix_instr_nonkdim: int
    waves_per_eu: int


class AuxRequest(NamedTuple):
    """Which auxiliary outputs ``flex_attention(..., return_aux=...)`` should return."""

    lse: bool = False
    max_scores: bool = False


class AuxOutput(NamedTuple):
    """Auxiliary outputs: float32 ``[B, Hq, L]`` tensors, or None where not requested.

    ``lse`` is the natural-log log-sum-exp of each row's kept scores (differentiable);
    ``max_scores`` their maximum (not differentiable). Both are -inf on a row that keeps
    nothing.
    """

    lse: Optional[Tensor] = None
    max_scores: Optional[Tensor] = None


# Options the operator's contract reserves for flex_attention itself.
_INTERNAL_OPTIONS = ("OUTPUT_LOGSUMEXP", "OUTPUT_MAX", _mask_patterns.PATTERN_KEY)
# Every key FlexKernelOptions declares, upper-cased, each also with a pass prefix.
_KNOWN_OPTIONS = frozenset(
    prefix + key.upper()
    for key in FlexKernelOptions.__annotations__
    for prefix in ("", "FWD_", "BWD_")
)
_warned_return_lse = False


# ---------------------------------------------------------------------------------------
# Validation (shapes, dtypes and devices only, so that Dynamo can trace it)
# ---------------------------------------------------------------------------------------
def _validate_tensors(query, key, value, enable_gqa: bool) -> None:
    for name, tensor in (("query", query), ("key", key), ("value", value)):
        if not isinstance(tensor, Tensor):
            raise ValueError(f"flex_attention: {name} must be a torch.Tensor, got {type(tensor).__name__}")
    if query.is_nested or key.is_nested or value.is_nested:
        raise NotImplementedError(
            "flex_attention does not support nested tensors (NestedTensor inputs); "
            "pass dense [B, H, L, E] tensors and describe ragged sequences with a block mask")
    if query.dtype != key.dtype or query.dtype != value.dtype:
        raise ValueError(
            f"Expected query, key, and value to have the same dtype, but got query.dtype: "
            f"{query.dtype}, key.dtype: {key.dtype}, and value.dtype: {value.dtype} instead.")
    if not query.dtype.is_floating_point:
        raise ValueError(f"flex_attention: query, key and value must be floating point, got {query.dtype}")
    if query.device != key.device or query.device != value.device:
        raise ValueError(
            f"Expected query, key, and value to have the same device type, but got query.device: "
            f"{query.device}, key.device: {key.device}, and value.device: {value.device} instead.")
    if query.dim() != 4 or key.dim() != 4 or value.dim() != 4:
        raise NotImplementedError(
            f"NYI: query, key, and value must be 4D tensors ([B, H, L, E]), but got query.dim()="
            f"{query.dim()}, key.dim()={key.dim()} and value.dim()={value.dim()}")
    batch, q_heads, _, q_dim = query.shape
    kv_batch, kv_heads, kv_len, k_dim = key.shape
    if q_dim != k_dim:
        raise ValueError(
            f"Expect query and key/value to have the same embedding dimension but got "
            f"E={q_dim} and E={k_dim}.")
    if value.shape[0] != kv_batch or value.shape[1] != kv_heads or value.shape[2] != kv_len:
        raise ValueError(
            f"Expect key and value to have the same batch size, number of heads and sequence "
            f"length, but got key.shape={tuple(key.shape)} and value.shape={tuple(value.shape)}.")
    if kv_batch != batch and kv_batch != 1:
        raise ValueError(
            f"Expect query and key/value to have the same batch size (or key/value batch size 1, "
            f"which broadcasts), but got Bq={batch} and Bkv={kv_batch}.")
    if q_heads == 0 or kv_heads == 0:
        raise ValueError(
            f"flex_attention: query and key/value need at least one head (dim 1), but got "
            f"Hq={q_heads} and Hkv={kv_heads}.")
    if q_dim == 0:
        raise ValueError(
            "flex_attention: query and key have head dim E=0 (dim 3); attention needs E >= 1 "
            "(the default scale is 1/sqrt(E)).")
    if not enable_gqa and q_heads != kv_heads:
        raise ValueError(
            f"Expect query and key/value to have the same number of heads but got Hq={q_heads} "
            f"and Hkv={kv_heads}. Try setting enable_gqa=True for GQA.")
    if q_heads % kv_heads != 0:
        raise ValueError(
            f"Expect number of query heads to be a multiple of kv heads for GQA but got "
            f"Hq={q_heads} and Hkv={kv_heads}.")


def _as_our_block_mask(block_mask) -> BlockMask:
    """``block_mask`` as our BlockMask. One made by PyTorch's own create_block_mask is
    taken by duck typing (its ``as_tuple()`` fields, see _compat), so that code building
    masks with torch can attend with us; torch's module is never imported."""
    if isinstance(block_mask, BlockMask):
        return block_mask
    looks_like_a_block_mask = callable(getattr(block_mask, "as_tuple", None)) and all(
        hasattr(block_mask, name) for name in ("BLOCK_SIZE", "seq_lengths", "mask_mod"))
    if not looks_like_a_block_mask:
        raise ValueError(
            f"flex_attention: block_mask must be a BlockMask (from create_block_mask, ours or "
            f"PyTorch's) or None, got {type(block_mask).__name__}")
    return BlockMask.from_tuple(_compat.block_mask_tuple_in_2_13_layout(block_mask.as_tuple()))


def _validate_block_mask(block_mask: BlockMask, query: Tensor, key: Tensor) -> None:
    mask = OperatorBlockMask(*block_mask.operator_tuple())
    q_len_mask, kv_len_mask = mask.q_len, mask.kv_len
    kv_num_blocks, kv_indices = mask.kv_num_blocks, mask.kv_indices
    q_block, kv_block = mask.q_block_size, mask.kv_block_size
    batch, q_heads, q_len, _ = query.shape
    kv_len = key.shape[2]
    if q_len != q_len_mask or kv_len != kv_len_mask:
        raise ValueError(
            f"block_mask was created for Q_LEN={q_len_mask} and KV_LEN={kv_len_mask} but got "
            f"q_len={q_len} and kv_len={kv_len}. Create the block mask for the sequence lengths "
            f"you call flex_attention with.")
    q_blocks = -(-q_len // q_block)
    if (kv_num_blocks.dim() != 3 or kv_indices.dim() != 4 or kv_num_blocks.shape[-1] != q_blocks
            or kv_indices.shape[-2] != q_blocks):
        raise ValueError(
            f"block_mask holds kv_num_blocks of shape {tuple(kv_num_blocks.shape)} and kv_indices "
            f"of shape {tuple(kv_indices.shape)}, which do not describe Q_LEN={q_len}, "
            f"KV_LEN={kv_len} in blocks of {q_block} x {kv_block} ({q_blocks} query blocks)")
    mask_batch, mask_heads = kv_num_blocks.shape[0], kv_num_blocks.shape[1]
    if mask_batch not in (1, batch) or mask_heads not in (1, q_heads):
        raise ValueError(
            f"block_mask has batch size {mask_batch} and {mask_heads} heads, which do not "
            f"broadcast against the query's batch size {batch} and {q_heads} heads (each must "
            f"be 1 or equal)")
    if kv_num_blocks.device != query.device:
        raise RuntimeError(
            f"Expect q/k/v and block_mask to be on the same device but got {query.device} and "
            f"{kv_num_blocks.device}.")


def _validate_arguments(score_mod, scale, kernel_options, return_lse, return_aux) -> None:
    if score_mod is not None and not callable(score_mod):
        raise ValueError(f"flex_attention: score_mod must be callable or None, got {type(score_mod).__name__}")
    scalar_types = (numbers.Real, torch.SymFloat, torch.SymInt)
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, scalar_types)):
        raise ValueError(f"flex_attention: scale must be a number (or None), got {type(scale).__name__}")
    if kernel_options is not None and not isinstance(kernel_options, Mapping):
        raise ValueError(
            f"flex_attention: kernel_options must be a dict (or None), got {type(kernel_options).__name__}")
    if return_aux is not None and not isinstance(return_aux, AuxRequest):
        raise ValueError(
            f"flex_attention: return_aux must be an AuxRequest (or None), got {type(return_aux).__name__}")
    if return_lse and return_aux is not None:
        raise ValueError(
            "Cannot specify both return_lse and return_aux. return_lse is deprecated; use "
            "return_aux=AuxRequest(lse=True) instead.")


# ---------------------------------------------------------------------------------------
# Defaults
# ---------------------------------------------------------------------------------------
def _full_block_mask(q_len: int, kv_len: int, device: torch.device) -> BlockMask:
    """A block mask keeping every score: every KV block is full for every query block.

    Built from the counts directly, without evaluating a mask_mod or transposing block
    lists. Eagerly the index rows are expanded (stride-0) views of one ``arange``:
    O(number of blocks) memory and time.

    Under compile the lengths may be symbolic, and any tensor whose size is a block count
    makes Dynamo guard on whether that count is 1 (a recompile when a length crosses 128).
    So each side then gets one spare block row and one spare index column that no count
    reaches, keeping every size provably at least 2, and the rows are materialized
    (O(blocks^2) int32, as any block mask of that size). Dynamo reads a traced length as a
    plain int, so whether we compile is the test. (Symbolic strides such as
    ``1 + ceil(S / 128)`` that this layout produces are why the templates render each
    stride as one parenthesised operand: ``lowering/template_kernel.py``.)
    """
    block = _DEFAULT_SPARSE_BLOCK_SIZE
    q_blocks = -(-q_len // block)
    kv_blocks = -(-kv_len // block)
    spare = 1 if torch.compiler.is_compiling() else 0

    def side(rows, cols):
        no_partial = torch.zeros((1, 1, rows + spare), dtype=torch.int32, device=device)
        all_full = torch.full((1, 1, rows + spare), cols, dtype=torch.int32, device=device)
        columns = torch.arange(cols + spare, dtype=torch.int32, device=device)
        if spare:
            columns = columns.clamp(max=cols - 1).repeat(1, 1, rows + spare, 1)
            return no_partial, torch.zeros_like(columns), all_full, columns
        unused = torch.zeros((1, 1, 1, 1), dtype=torch.int32, device=device).expand(1, 1, rows, cols)
        return no_partial, unused, all_full, columns.expand(1, 1, rows, cols)

    kv_num, kv_idx, full_kv_num, full_kv_idx = side(q_blocks, kv_blocks)
    q_num, q_idx, full_q_num, full_q_idx = side(kv_blocks, q_blocks)
    return BlockMask((q_len, kv_len), kv_num, kv_idx, full_kv_num, full_kv_idx, q_num, q_idx,
                     full_q_num, full_q_idx, BLOCK_SIZE=(block, block), mask_mod=noop_mask)


def _kernel_options(kernel_options, need_lse: bool, need_max: bool,
                    mask_pattern: Optional[str] = None) -> dict:
    """A fresh dict: the caller's options with upper-cased keys, plus the output flags and
    the block mask's proven pattern (only when there is one)."""
    options = {}
    for name, setting in (kernel_options or {}).items():
        upper = str(name).upper()
        if upper in _INTERNAL_OPTIONS:
            raise ValueError(
                f"flex_attention: kernel_options must not set {name}; flex_attention sets it (from "
                f"return_aux, whether gradients are needed, and the block mask)")
        if upper in options:
            raise ValueError(f"flex_attention: kernel_options sets {upper} twice (keys are case-insensitive)")
        if upper not in _KNOWN_OPTIONS and not torch.compiler.is_compiling():
            warnings.warn(f"flex_attention: unknown kernel option {name!r} is ignored (the known "
                          f"ones are the keys of FlexKernelOptions)", UserWarning, stacklevel=3)
        options[upper] = setting
    check_backend(options)
    options["OUTPUT_LOGSUMEXP"] = need_lse
    options["OUTPUT_MAX"] = need_max
    if mask_pattern is not None:
        options[_mask_patterns.PATTERN_KEY] = mask_pattern
    return options


def _warn_return_lse_deprecated() -> None:
    global _warned_return_lse
    if not _warned_return_lse and not torch.compiler.is_compiling():
        _warned_return_lse = True
        warnings.warn("return_lse is deprecated; use return_aux=AuxRequest(lse=True), which "
                      "returns (out, AuxOutput(lse=...))", FutureWarning, stacklevel=3)


# ---------------------------------------------------------------------------------------
# Debug mode: mods on plain scalars
# ---------------------------------------------------------------------------------------
class _OnePositionAtATime(torch.autograd.Function):
    """Calls a mod on plain 0-d tensors, one position at a time, even under ``torch.vmap``.

    Its vmap rule peels one batch level off by looping over it and calling itself again on
    the slices, so under the four nested vmaps of the grid evaluation the mod itself only
    ever sees unbatched scalars. No backward: debug mode is forward-only.
    """

    @staticmethod
    def forward(mod, *args):
        return torch.as_tensor(mod(*args), device=args[0].device)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def vmap(info, in_dims, mod, *args):
        arg_dims = in_dims[1:]
        results = [
            _OnePositionAtATime.apply(mod, *[a if d is None else a.select(d, i)
                                             for a, d in zip(args, arg_dims)])
            for i in range(info.batch_size)
        ]
        return torch.stack(results), 0


def _one_position_at_a_time(mod: Callable) -> Callable:
    def per_position(*args):
        return _OnePositionAtATime.apply(mod, *args)

    return per_position


# ---------------------------------------------------------------------------------------
# flex_attention
# ---------------------------------------------------------------------------------------
def flex_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    score_mod: Optional[Callable] = None,
    block_mask: Optional[BlockMask] = None,
    scale: Optional[float] = None,
    enable_gqa: bool = False,
    return_lse: bool = False,
    kernel_options: Optional[FlexKernelOptions] = None,
    *,
    return_aux: Optional[AuxRequest] = None,
) -> Union[Tensor, Tuple[Tensor, Tensor], Tuple[Tensor, AuxOutput]]:
    """Attention whose scores a Python function may rewrite and a block mask may sparsify.

    For every batch ``b``, query head ``h``, query position ``q_idx`` and key position
    ``kv_idx``::

        score = score_mod(scale * query[b, h, q_idx] @ key[b, h // G, kv_idx], b, h, q_idx, kv_idx)

    where ``G = Hq // Hkv`` (grouped-query attention, ``enable_gqa=True``). The score is
    kept when ``block_mask`` keeps the position (its mask_mod, evaluated where the block
    mask cannot decide by whole blocks); the kept scores of each row are softmax-normalized
    and weight the rows of ``value``. A row that keeps nothing yields zeros.

    Args:
        query: ``[B, Hq, L, E]``.
        key: ``[B or 1, Hkv, S, E]``; batch 1 broadcasts over the query's batch.
        value: ``[B or 1, Hkv, S, Ev]``.
        score_mod: ``(score, b, h, q_idx, kv_idx) -> score`` on 0-d tensors (indices int32);
            None leaves the scores as they are. Tensors it closes over receive gradients.
        block_mask: a ``BlockMask`` for ``(L, S)``, whose batch and head dims are 1 or equal
            the query's; None keeps every score.
        scale: multiplies ``query @ key^T``; default ``1 / sqrt(E)``.
        enable_gqa: allow ``Hq != Hkv`` (``Hq`` a multiple of ``Hkv``).
        return_lse: deprecated; also return the log-sum-exp. Prefer ``return_aux``.
        kernel_options: tuning knobs for the fused kernels (see ``FlexKernelOptions``);
            never modified.
        return_aux: an ``AuxRequest`` naming the auxiliary outputs to return.

    Returns:
        ``out [B, Hq, L, Ev]`` in the query's dtype; ``(out, lse)`` with ``return_lse``;
        ``(out, AuxOutput(lse, max_scores))`` with ``return_aux`` (unrequested fields None).
        lse and max_scores are float32 ``[B, Hq, L]``, natural log units.

    Eager calls compute the exact result in chunks of query rows (memory
    O(chunk x S)); wrap in ``torch.compile`` for the fused kernels. See the module
    docstring for ``DEBUG_MODS``, the switch that makes mods printable per position.
    """
    _validate_tensors(query, key, value, enable_gqa)
    _validate_arguments(score_mod, scale, kernel_options, return_lse, return_aux)
    if block_mask is None:
        block_mask = _full_block_mask(query.shape[2], key.shape[2], query.device)._tag_pattern(
            _mask_patterns.FULL)
    else:
        block_mask = _as_our_block_mask(block_mask)
        _validate_block_mask(block_mask, query, key)
    if score_mod is None:
        score_mod = identity_score_mod
    if scale is None:
        scale = 1.0 / math.sqrt(query.shape[-1])
    if return_lse:
        _warn_return_lse_deprecated()

    want_lse = bool(return_lse) or (return_aux is not None and return_aux.lse)
    want_max = return_aux is not None and return_aux.max_scores
    needs_grad = torch.is_grad_enabled() and (query.requires_grad or key.requires_grad
                                              or value.requires_grad)
    options = _kernel_options(kernel_options, want_lse or needs_grad, want_max,
                              block_mask._proven_pattern())

    block_mask_tuple = block_mask.operator_tuple()
    if DEBUG_MODS and not torch.compiler.is_compiling():
        score_mod = _one_position_at_a_time(score_mod)
        operator_mask = OperatorBlockMask(*block_mask_tuple)
        block_mask_tuple = operator_mask.with_mask_mod(_one_position_at_a_time(operator_mask.mask_mod))

    out, lse, max_scores = inductor_flex_attention(query, key, value, score_mod, block_mask_tuple,
                                                   scale, options, (), ())
    if return_aux is not None:
        return out, AuxOutput(lse=lse if return_aux.lse else None,
                              max_scores=max_scores.detach() if return_aux.max_scores else None)
    if return_lse:
        return out, lse
    return out
