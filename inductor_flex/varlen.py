"""``varlen_attn``: attention over packed variable-length sequences, on our kernels.

The signature is that of ``torch.nn.attention.varlen.varlen_attn`` (torch 2.13): packed
``[T, H, D]`` tensors, int32 cumulative offsets ``cu_seq_q`` / ``cu_seq_k``, a
``(left, right)`` window where -1 is unbounded (``(-1, 0)`` is causal, aligned at the
bottom right of each document when its query and key counts differ), GQA, and
``return_aux=AuxRequest(lse=True)`` for the ``[H, T]`` float32 log-sum-exp. Extensions,
keyword-only: ``score_mod`` and ``mask_mod``, called with document-local ``q_idx`` /
``kv_idx`` (0 at each document's first token; ``b`` is always 0).

How it runs (docs/guide.md, "Packed sequences"): the packed tensors are viewed as
``[1, H, T, D]`` and attended with our flex operator under a document block mask built
from the offsets on the device (``masks/_cu_seq_blocks.py``, no host sync). Without mods
the call is the custom op ``torch.ops.inductor_flex.varlen_attn`` (backward:
``varlen_attn_backward``), so Dynamo, AOTAutograd and ``opcheck`` see exactly those
two; Inductor decomposes each into our flex operator (``register_decompositions``) and
lowers that to the fused templates. With mods the function calls ``flex_attention``
directly: a custom op cannot take Python callables, and this way tensors the mods close
over get gradients.
"""
import math
from numbers import Integral
from typing import Callable, NamedTuple, Optional, Tuple, Union

import torch
from torch import Tensor

from ._mods import identity_score_mod
from .block_mask import _DEFAULT_SPARSE_BLOCK_SIZE, BlockMask
from .masks._cu_seq_blocks import cu_seq_block_lists, cu_seq_layout
from .ops import inductor_flex_attention, inductor_flex_attention_backward
from .ops._shared import as_leaf_kernel

__all__ = ["AuxRequest", "varlen_attn"]

_BLOCK = (_DEFAULT_SPARSE_BLOCK_SIZE, _DEFAULT_SPARSE_BLOCK_SIZE)
# What the flex operator is asked for: lse (returned, and needed by the backward), no max.
_KERNEL_OPTIONS = {"OUTPUT_LOGSUMEXP": True, "OUTPUT_MAX": False}


class AuxRequest(NamedTuple):
    """Which auxiliary outputs ``varlen_attn(..., return_aux=...)`` returns."""

    lse: bool = False


# ---------------------------------------------------------------------------------------
# The element mask, in terms of per-token layout tensors
# ---------------------------------------------------------------------------------------
def _at(table: Tensor, index: Tensor) -> Tensor:
    # aten.index directly: ``table[index]`` would read a 0-d index on the host wherever no
    # tracer routes it (the eager dense kernel run from a compiled graph, under vmap).
    return torch.ops.aten.index.Tensor(table, [index])


def _document_keep(q_idx, kv_idx, q_doc, kv_doc, q_end, kv_end, left: int, right: int,
                   bounded_kv: bool):
    """Same document, inside the window around the bottom-right diagonal, and (with
    ``bounded_kv``, i.e. seqused_k) a used key."""
    keep = _at(q_doc, q_idx) == _at(kv_doc, kv_idx)
    if left >= 0 or right >= 0:
        # Key offset from the diagonal: (j - Lk) - (i - Lq) in document-local positions.
        offset = (kv_idx - _at(kv_end, kv_idx)) - (q_idx - _at(q_end, q_idx))
        if left >= 0:
            keep = keep & (offset >= -left)
        if right >= 0:
            keep = keep & (offset <= right)
    if bounded_kv:
        keep = keep & (kv_idx < _at(kv_end, kv_idx))
    return keep


def _mask_mod_on_buffers(left: int, right: int, bounded_kv: bool) -> Callable:
    """mask_mod taking the layout tensors as explicit buffers (what the operators carry)."""
    def varlen_document_mask(b, h, q_idx, kv_idx, q_doc, kv_doc, q_end, kv_end):
        return _document_keep(q_idx, kv_idx, q_doc, kv_doc, q_end, kv_end, left, right,
                              bounded_kv)

    return varlen_document_mask


def _window(window_size) -> Tuple[int, int]:
    if (not isinstance(window_size, (tuple, list)) or len(window_size) != 2
            or not all(isinstance(w, Integral) and not isinstance(w, bool) for w in window_size)):
        raise ValueError(f"varlen_attn: window_size must be a pair of ints (left, right), got "
                         f"{window_size!r}")
    left, right = (int(w) for w in window_size)
    if left < -1 or right < -1:
        raise ValueError(f"varlen_attn: window_size entries must be >= 0, or -1 for unbounded; "
                         f"got {window_size!r}")
    return left, right


class _Packed(NamedTuple):
    """The operator-level view of one varlen call."""

    query: Tensor  # [1, Hq, Tq, D]
    key: Tensor
    value: Tensor
    block_mask: tuple  # operator tuple, mask_mod taking ``buffers``
    buffers: tuple


def _packed(query, key, value, cu_seq_q, cu_seq_k, window_left, window_right,
            seqused_k=None) -> _Packed:
    q_len, kv_len = query.shape[0], key.shape[0]
    q_layout = cu_seq_layout(cu_seq_q, q_len)
    kv_layout = cu_seq_layout(cu_seq_k, kv_len, seqused_k)
    lists = cu_seq_block_lists(cu_seq_q, cu_seq_k, q_len, kv_len, (window_left, window_right),
                               seqused_k, _BLOCK, q_layout=q_layout, kv_layout=kv_layout)
    mask_mod = _mask_mod_on_buffers(window_left, window_right, seqused_k is not None)
    block_mask = (q_len, kv_len, *lists, *_BLOCK, mask_mod)
    views = [t.unsqueeze(0).transpose(1, 2) for t in (query, key, value)]
    return _Packed(*views, block_mask, (q_layout.doc, kv_layout.doc, q_layout.end, kv_layout.end))


def _unpack(out: Tensor) -> Tensor:
    """``[1, H, T, E]`` -> ``[T, H, E]``, contiguous."""
    return out.squeeze(0).transpose(0, 1).contiguous()


def _forward(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, scale, window_left,
             window_right, seqused_k=None) -> Tuple[Tensor, Tensor]:
    """(out ``[Tq, Hq, Dv]``, lse ``[Hq, Tq]``) through the flex operator: the forward op's
    implementation (eager) and its decomposition (Inductor). Takes the op's arguments."""
    packed = _packed(query, key, value, cu_seq_q, cu_seq_k, window_left, window_right, seqused_k)
    out, lse, _ = inductor_flex_attention(packed.query, packed.key, packed.value,
                                          identity_score_mod, packed.block_mask, scale,
                                          dict(_KERNEL_OPTIONS), (), packed.buffers)
    return _unpack(out), lse.squeeze(0).contiguous()


def _identity_joint(query: Tensor) -> Callable:
    from .ops.autograd import _is_traced, build_joint_graph, joint_function

    if _is_traced([query]):
        return build_joint_graph(identity_score_mod, query, (), [])
    return joint_function(identity_score_mod, [])


def _backward(grad_out, grad_lse, query, key, value, out, lse, cu_seq_q, cu_seq_k, max_q, max_k,
              scale, window_left, window_right) -> Tuple[Tensor, Tensor, Tensor]:
    """Gradients through the flex backward operator: the backward op's implementation and
    its decomposition. Takes the op's arguments."""
    packed = _packed(query, key, value, cu_seq_q, cu_seq_k, window_left, window_right)
    grad_query, grad_key, grad_value, _ = inductor_flex_attention_backward(
        packed.query, packed.key, packed.value, out.unsqueeze(0).transpose(1, 2),
        lse.unsqueeze(0), grad_out.unsqueeze(0).transpose(1, 2),
        None if grad_lse is None else grad_lse.unsqueeze(0), identity_score_mod,
        _identity_joint(query), packed.block_mask, scale, dict(_KERNEL_OPTIONS), (),
        packed.buffers)
    return _unpack(grad_query), _unpack(grad_key), _unpack(grad_value)


# ---------------------------------------------------------------------------------------
# The custom ops
# ---------------------------------------------------------------------------------------
@torch.library.custom_op("inductor_flex::varlen_attn", mutates_args=())
def varlen_attn_op(query: Tensor, key: Tensor, value: Tensor, cu_seq_q: Tensor,
                   cu_seq_k: Tensor, max_q: int, max_k: int, scale: float, window_left: int,
                   window_right: int, seqused_k: Optional[Tensor] = None
                   ) -> Tuple[Tensor, Tensor]:
    """Packed attention: (out ``[Tq, Hq, Dv]``, lse ``[Hq, Tq]`` float32). Arguments are
    those of ``varlen_attn``, validated and resolved (``scale`` a float, the window as two
    ints). ``max_q`` / ``max_k`` are not needed by the computation."""
    with as_leaf_kernel():
        return _forward(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, scale, window_left,
                        window_right, seqused_k)


@varlen_attn_op.register_fake
def _varlen_attn_fake(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, scale, window_left,
                      window_right, seqused_k=None):
    q_len, heads = query.shape[0], query.shape[1]
    out = query.new_empty((q_len, heads, value.shape[-1]))
    return out, query.new_empty((heads, q_len), dtype=torch.float32)


@torch.library.custom_op("inductor_flex::varlen_attn_backward", mutates_args=())
def varlen_attn_backward_op(grad_out: Tensor, grad_lse: Optional[Tensor], query: Tensor,
                            key: Tensor, value: Tensor, out: Tensor, lse: Tensor,
                            cu_seq_q: Tensor, cu_seq_k: Tensor, max_q: int, max_k: int,
                            scale: float, window_left: int, window_right: int
                            ) -> Tuple[Tensor, Tensor, Tensor]:
    """Gradients of query, key and value (contiguous) of ``varlen_attn`` for the cotangents
    of out and (optional) lse."""
    with as_leaf_kernel():
        return _backward(grad_out, grad_lse, query, key, value, out, lse, cu_seq_q, cu_seq_k,
                         max_q, max_k, scale, window_left, window_right)


@varlen_attn_backward_op.register_fake
def _varlen_attn_backward_fake(grad_out, grad_lse, query, key, value, out, lse, cu_seq_q,
                               cu_seq_k, max_q, max_k, scale, window_left, window_right):
    return tuple(t.new_empty(t.shape) for t in (query, key, value))


def _setup_context(ctx, inputs, output):
    (query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, scale, window_left, window_right,
     seqused_k) = inputs
    if seqused_k is not None:
        raise RuntimeError("varlen_attn: seqused_k is inference-only (no backward); call it "
                           "under torch.no_grad() or with inputs that do not require grad")
    out, lse = output
    ctx.save_for_backward(query, key, value, out, lse, cu_seq_q, cu_seq_k)
    ctx.arguments = (max_q, max_k, scale, window_left, window_right)
    ctx.set_materialize_grads(False)


def _autograd_backward(ctx, grad_out, grad_lse):
    query, key, value, out, lse, cu_seq_q, cu_seq_k = ctx.saved_tensors
    if grad_out is None:  # only lse reached the loss
        grad_out = torch.zeros_like(out)
    grads = varlen_attn_backward_op(grad_out, grad_lse, query, key, value, out, lse, cu_seq_q,
                                    cu_seq_k, *ctx.arguments)
    return (*grads,) + (None,) * 8


varlen_attn_op.register_autograd(_autograd_backward, setup_context=_setup_context)


def register_decompositions(register: Callable) -> None:
    """Give Inductor the decompositions of both custom ops into the flex operators, which
    it lowers to the fused templates (``register(op, function)``, see
    ``_compat.register_inductor_decomposition``). Each is the op's own implementation."""
    register(torch.ops.inductor_flex.varlen_attn.default, _forward)
    register(torch.ops.inductor_flex.varlen_attn_backward.default, _backward)


# ---------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------
def _check_static(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, enable_gqa, seqused_k,
                  block_table, num_splits, score_mod, mask_mod) -> None:
    """Checks on types, shapes, dtypes and devices only: they hold under torch.compile too."""
    fn = "varlen_attn"
    if block_table is not None:
        raise NotImplementedError(
            f"{fn}: block_table (a paged KV cache) is not supported yet; gather the pages into "
            f"packed key/value tensors, or use inductor_flex's PagedAttention once it exists")
    for name, tensor in (("query", query), ("key", key), ("value", value)):
        if not isinstance(tensor, Tensor) or tensor.dim() != 3:
            shape = tuple(tensor.shape) if isinstance(tensor, Tensor) else type(tensor).__name__
            raise ValueError(f"{fn}: {name} must be a packed [T, H, D] tensor, got {shape}")
    if not (query.dtype == key.dtype == value.dtype) or not query.dtype.is_floating_point:
        raise ValueError(f"{fn}: query, key and value must share one floating dtype, got "
                         f"{query.dtype}, {key.dtype} and {value.dtype}")
    if key.shape[:2] != value.shape[:2]:
        raise ValueError(f"{fn}: key {tuple(key.shape)} and value {tuple(value.shape)} must have "
                         f"the same number of tokens and heads")
    if query.shape[2] != key.shape[2]:
        raise ValueError(f"{fn}: query and key must have the same head dim, got "
                         f"{query.shape[2]} and {key.shape[2]}")
    heads_q, heads_k = query.shape[1], key.shape[1]
    if not enable_gqa and heads_q != heads_k:
        raise ValueError(f"{fn}: query has {heads_q} heads and key/value {heads_k}; they must "
                         f"match, or set enable_gqa=True for grouped-query attention")
    if heads_k == 0 or heads_q % heads_k != 0:
        raise ValueError(f"{fn}: the number of query heads ({heads_q}) must be a multiple of "
                         f"the number of key/value heads ({heads_k})")
    tensors = [("cu_seq_q", cu_seq_q), ("cu_seq_k", cu_seq_k)]
    if seqused_k is not None:
        tensors.append(("seqused_k", seqused_k))
    for name, offsets in tensors:
        if not isinstance(offsets, Tensor) or offsets.dtype != torch.int32 or offsets.dim() != 1:
            got = (f"{offsets.dtype} tensor of shape {tuple(offsets.shape)}"
                   if isinstance(offsets, Tensor) else type(offsets).__name__)
            raise ValueError(f"{fn}: {name} must be a 1-D int32 tensor, got {got}")
    if cu_seq_q.shape[0] < 2 or cu_seq_q.shape != cu_seq_k.shape:
        raise ValueError(f"{fn}: cu_seq_q and cu_seq_k must both hold N + 1 >= 2 offsets "
                         f"(N documents), got shapes {tuple(cu_seq_q.shape)} and "
                         f"{tuple(cu_seq_k.shape)}")
    if seqused_k is not None and seqused_k.shape[0] != cu_seq_k.shape[0] - 1:
        raise ValueError(f"{fn}: seqused_k must hold one count per document "
                         f"({cu_seq_k.shape[0] - 1}), got shape {tuple(seqused_k.shape)}")
    devices = {t.device for t in (query, key, value, cu_seq_q, cu_seq_k)}
    if len(devices) != 1:
        raise ValueError(f"{fn}: query, key, value, cu_seq_q and cu_seq_k must be on one "
                         f"device, got {sorted(map(str, devices))}")
    for name, bound in (("max_q", max_q), ("max_k", max_k)):
        if isinstance(bound, bool) or not isinstance(bound, (Integral, torch.SymInt)):
            raise ValueError(f"{fn}: {name} must be an int, got {type(bound).__name__}")
    if num_splits is not None and (isinstance(num_splits, bool)
                                   or not isinstance(num_splits, Integral) or num_splits < 1):
        raise ValueError(f"{fn}: num_splits must be None or a positive int, got {num_splits!r}")
    for name, mod in (("score_mod", score_mod), ("mask_mod", mask_mod)):
        if mod is not None and not callable(mod):
            raise ValueError(f"{fn}: {name} must be callable or None, got {type(mod).__name__}")


def _check_offsets(name: str, offsets: Tensor, total: int, longest: int, longest_name: str) -> None:
    """Value checks of cumulative offsets (they read the tensor: eager mode only)."""
    values = offsets.tolist()
    if values[0] != 0:
        raise ValueError(f"varlen_attn: {name} must start at 0, got {values[0]}")
    lengths = [b - a for a, b in zip(values, values[1:])]
    if min(lengths) < 0:
        raise ValueError(f"varlen_attn: {name} must be non-decreasing (cumulative sequence "
                         f"lengths), got {values}")
    if values[-1] != total:
        raise ValueError(f"varlen_attn: the last entry of {name} ({values[-1]}) must equal the "
                         f"number of packed tokens ({total})")
    if max(lengths) > longest:
        raise ValueError(f"varlen_attn: {longest_name}={longest} is smaller than the longest "
                         f"sequence in {name} ({max(lengths)})")


def _check_values(query, key, cu_seq_q, cu_seq_k, max_q, max_k, seqused_k) -> None:
    _check_offsets("cu_seq_q", cu_seq_q, query.shape[0], max_q, "max_q")
    _check_offsets("cu_seq_k", cu_seq_k, key.shape[0], max_k, "max_k")
    if seqused_k is not None:
        lengths = cu_seq_k.diff()
        if bool(((seqused_k < 0) | (seqused_k > lengths)).any()):
            raise ValueError(f"varlen_attn: seqused_k must lie between 0 and each document's "
                             f"key count {lengths.tolist()}, got {seqused_k.tolist()}")


# ---------------------------------------------------------------------------------------
# With score_mod / mask_mod: straight through flex_attention
# ---------------------------------------------------------------------------------------
def _attend_with_mods(query, key, value, cu_seq_q, cu_seq_k, scale, window, seqused_k,
                      enable_gqa, score_mod, mask_mod) -> Tuple[Tensor, Tensor]:
    from .api import flex_attention
    from .api import AuxRequest as FlexAuxRequest

    left, right = window
    q_len, kv_len = query.shape[0], key.shape[0]
    q_layout = cu_seq_layout(cu_seq_q, q_len)
    kv_layout = cu_seq_layout(cu_seq_k, kv_len, seqused_k)
    # The user's mod may drop any pair, so no block is known to be full.
    lists = cu_seq_block_lists(cu_seq_q, cu_seq_k, q_len, kv_len, window, seqused_k, _BLOCK,
                               allow_full=mask_mod is None, q_layout=q_layout,
                               kv_layout=kv_layout)
    q_local = torch.arange(q_len, dtype=torch.int32, device=query.device) - q_layout.start
    kv_local = torch.arange(kv_len, dtype=torch.int32, device=query.device) - kv_layout.start
    bounded_kv = seqused_k is not None

    def varlen_mask(b, h, q_idx, kv_idx):
        keep = _document_keep(q_idx, kv_idx, q_layout.doc, kv_layout.doc, q_layout.end,
                              kv_layout.end, left, right, bounded_kv)
        if mask_mod is not None:
            keep = keep & mask_mod(b, h, _at(q_local, q_idx), _at(kv_local, kv_idx))
        return keep

    def varlen_score(score, b, h, q_idx, kv_idx):
        return score_mod(score, b, h, _at(q_local, q_idx), _at(kv_local, kv_idx))

    block_mask = BlockMask((q_len, kv_len), *lists, BLOCK_SIZE=_BLOCK, mask_mod=varlen_mask)
    out, aux = flex_attention(
        *(t.unsqueeze(0).transpose(1, 2) for t in (query, key, value)),
        score_mod=None if score_mod is None else varlen_score, block_mask=block_mask,
        scale=scale, enable_gqa=enable_gqa, return_aux=FlexAuxRequest(lse=True))
    return out.squeeze(0).transpose(0, 1), aux.lse.squeeze(0)


# ---------------------------------------------------------------------------------------
# The public function
# ---------------------------------------------------------------------------------------
def varlen_attn(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    cu_seq_q: Tensor,
    cu_seq_k: Optional[Tensor],
    max_q: int,
    max_k: int,
    *,
    return_aux: Optional[AuxRequest] = None,
    scale: Optional[float] = None,
    window_size: Tuple[int, int] = (-1, -1),
    enable_gqa: bool = False,
    seqused_k: Optional[Tensor] = None,
    block_table: Optional[Tensor] = None,
    num_splits: Optional[int] = None,
    score_mod: Optional[Callable] = None,
    mask_mod: Optional[Callable] = None,
) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """Attention within each of N packed sequences.

    Args:
        query: ``[Tq, Hq, D]``, the N query sequences one after another.
        key, value: ``[Tk, Hkv, D]`` / ``[Tk, Hkv, Dv]``.
        cu_seq_q, cu_seq_k: int32 ``[N + 1]`` offsets, ``[0, end_0, end_1, ..., T]``;
            ``cu_seq_k=None`` means ``cu_seq_q``.
        max_q, max_k: the longest query / key sequence (checked in eager mode; the
            computation does not need them).
        return_aux: ``AuxRequest(lse=True)`` also returns lse, float32 ``[Hq, Tq]``
            (natural log; differentiable).
        scale: multiplies ``q . k``; default ``1 / sqrt(D)``.
        window_size: ``(left, right)``: query ``i`` of a sequence with ``Lq`` queries and
            ``Lk`` keys sees keys ``j`` with ``i + Lk - Lq - left <= j <= i + Lk - Lq + right``;
            -1 leaves that side unbounded. ``(-1, 0)`` is causal.
        enable_gqa: allow ``Hq`` a multiple of ``Hkv``.
        seqused_k: int32 ``[N]``: only the first ``seqused_k[i]`` keys of sequence ``i``
            are used (inference only).
        block_table: paged KV cache; not supported yet (raises).
        num_splits: accepted for compatibility; our kernels do not split the KV loop.
        score_mod, mask_mod: as for ``flex_attention``, called with document-local
            ``q_idx`` / ``kv_idx``; ``mask_mod`` narrows the window and documents.

    Returns ``out [Tq, Hq, Dv]`` in the query's dtype, or ``(out, lse)``. A query that sees
    no key gets zeros (lse -inf). Value checks of the offsets (int32, starting at 0,
    non-decreasing, ending at T, max_q / max_k) run in eager mode; under torch.compile
    only those that need no device read do.
    """
    if cu_seq_k is None:
        cu_seq_k = cu_seq_q
    _check_static(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, enable_gqa, seqused_k,
                  block_table, num_splits, score_mod, mask_mod)
    window = _window(window_size)
    if return_aux is not None and not isinstance(return_aux, AuxRequest):
        if not (isinstance(return_aux, tuple) and hasattr(return_aux, "lse")):
            raise ValueError(f"varlen_attn: return_aux must be an AuxRequest or None, got "
                             f"{type(return_aux).__name__}")
    if not torch.compiler.is_compiling():
        _check_values(query, key, cu_seq_q, cu_seq_k, max_q, max_k, seqused_k)
    if scale is None:
        scale = 1.0 / math.sqrt(query.shape[-1])
    if score_mod is None and mask_mod is None:
        out, lse = varlen_attn_op(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k,
                                  float(scale), *window, seqused_k)
    else:
        out, lse = _attend_with_mods(query, key, value, cu_seq_q, cu_seq_k, scale, window,
                                     seqused_k, enable_gqa, score_mod, mask_mod)
    if return_aux is not None and return_aux.lse:
        return out, lse
    return out
