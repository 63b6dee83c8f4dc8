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
from the offsets on the device (``masks/_packed_blocks.py``, no host sync). Without mods
the call is the custom op ``torch.ops.inductor_flex.varlen_attn`` (backward:
``varlen_attn_backward``), so Dynamo, AOTAutograd and ``opcheck`` see exactly those
two; Inductor decomposes each into our flex operator (``register_decompositions``) and
lowers that to the fused templates. ``block_table`` (a paged KV cache, forward only) views
the page pool as one key sequence with one KV block per page and maps the block lists of
a virtual packing through the table (``_paged``). With mods the function calls ``flex_attention``
directly: a custom op cannot take Python callables, and this way tensors the mods close
over get gradients.
"""
import math
from numbers import Integral
from typing import Callable, NamedTuple, Optional, Tuple, Union

import torch
from torch import Tensor

from ._mods import identity_score_mod
from ._block_lists import dense_to_listed
from .block_mask import _DEFAULT_SPARSE_BLOCK_SIZE, BlockMask
from .masks._packed_blocks import cu_seq_block_lists, packed_layout
from .ops import inductor_flex_attention, inductor_flex_attention_backward
from .ops._shared import as_leaf_kernel
from ._pages import page_to_logical, physical_to_logical_of_table

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


def _in_window(keep, kv_from_end, q_from_end, left: int, right: int):
    """``keep`` narrowed to the window around the bottom-right diagonal; ``kv_from_end`` /
    ``q_from_end`` are ``j - Lk`` / ``i - Lq`` in document-local positions."""
    if left >= 0 or right >= 0:
        offset = kv_from_end - q_from_end  # the key's offset from the diagonal
        if left >= 0:
            keep = keep & (offset >= -left)
        if right >= 0:
            keep = keep & (offset <= right)
    return keep


def _visible_keys(q_layout, cu_seq_k: Tensor, left: int, right: int,
                  used_k: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """``(first, last)``: per query token, the inclusive range of key positions it sees.
    Its document's keys (the used ones with ``used_k``), cut to the window around the
    bottom-right diagonal; ``first > last`` when it sees none. One range per query makes
    the element mask two loads on the query side, none per key. ``q_layout``: the
    queries' ``packed_layout``."""
    cu_seq_k = cu_seq_k.to(torch.int32)
    kv_first = _at(cu_seq_k, q_layout.doc)
    kv_end = (_at(cu_seq_k, q_layout.doc + 1) if used_k is None
              else kv_first + _at(used_k.to(torch.int32), q_layout.doc))
    first, last = kv_first, kv_end - 1
    if left >= 0 or right >= 0:
        positions = torch.arange(q_layout.doc.shape[0], dtype=torch.int32, device=cu_seq_k.device)
        diagonal = positions - q_layout.end + kv_end  # the key level with this query
        if left >= 0:
            first = torch.maximum(first, diagonal - left)
        if right >= 0:
            last = torch.minimum(last, diagonal + right)
    return first, last


def _in_range(q_idx, kv_idx, first, last):
    return (kv_idx >= _at(first, q_idx)) & (kv_idx <= _at(last, q_idx))


def _paged_keep(q_idx, kv_idx, q_doc, q_end, physical_to_logical, used_k, page_size: int,
                left: int, right: int):
    """(keep, logical kv_idx) of a cache position for a query: the page belongs to the
    query's sequence, the logical position is a used key, and it lies inside the window."""
    doc = _at(q_doc, q_idx)
    owned, logical = page_to_logical(physical_to_logical, doc, kv_idx, page_size)
    kv_from_end = logical - _at(used_k, doc)
    keep = _in_window(owned & (kv_from_end < 0), kv_from_end, q_idx - _at(q_end, q_idx),
                      left, right)
    return keep, logical


def varlen_document_mask(b, h, q_idx, kv_idx, first, last):
    """The element mask of a varlen call, on the ``_visible_keys`` tables as buffers."""
    return _in_range(q_idx, kv_idx, first, last)


def _paged_mask_mod_on_buffers(left: int, right: int, page_size: int) -> Callable:
    def varlen_paged_mask(b, h, q_idx, kv_idx, q_doc, q_end, physical_to_logical, used_k):
        return _paged_keep(q_idx, kv_idx, q_doc, q_end, physical_to_logical, used_k,
                           page_size, left, right)[0]

    return varlen_paged_mask


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


def _first_visits(num_blocks: Tensor, pages: Tensor, n_pages: int) -> Tuple[Tensor, Tensor]:
    """The listed ``pages`` of each row with repeats dropped (the first visit kept, order
    kept): a page shared by two sequences whose queries share a block would otherwise be
    walked, and counted, twice."""
    width = pages.shape[-1]
    slot = torch.arange(width, dtype=torch.int32, device=pages.device).expand(pages.shape)
    target = torch.where(slot < num_blocks.unsqueeze(-1), pages.to(torch.int64), n_pages)
    first = torch.full((*pages.shape[:-1], n_pages + 1), width, dtype=torch.int32,
                       device=pages.device)
    first = first.scatter_reduce(-1, target, slot, "amin")
    kept_num_blocks, kept_slots = dense_to_listed((target < n_pages) & (first.gather(-1, target) == slot))
    return kept_num_blocks, pages.gather(-1, kept_slots.to(torch.int64))


def _paged(query, key, value, cu_seq_q, window_left, window_right, seqused_k,
           block_table) -> _Packed:
    """The operator view of a call on a paged cache ``key``/``value [n_pages, page_size,
    H, D]`` (docs/guide.md, "Packed sequences"). Forward only: no ``q_*`` lists."""
    q_len = query.shape[0]
    n_pages, page_size = key.shape[0], key.shape[1]
    docs, width = block_table.shape
    span = width * page_size  # logical key slots a table row can address
    q_layout = packed_layout(cu_seq_q, q_len)
    # The block lists of a virtual packing that gives each sequence ``span`` key slots, in
    # logical order; virtual block ``d * width + j`` is page ``block_table[d, j]``.
    virtual_cu_k = torch.arange(docs + 1, dtype=torch.int32, device=query.device) * span
    kv_num, kv_virtual, full_num, full_virtual, *_ = cu_seq_block_lists(
        cu_seq_q, virtual_cu_k, q_len, docs * span, (window_left, window_right), seqused_k,
        (_BLOCK[0], page_size), transposed=False)
    # Unlisted slots name table entries that may hold anything: keep them in range.
    pages = block_table.flatten().clamp(0, n_pages - 1)
    kv_num, kv_pages = _first_visits(kv_num, _at(pages, kv_virtual), n_pages)
    pages_used = (seqused_k + page_size - 1) // page_size
    physical_to_logical = physical_to_logical_of_table(block_table, pages_used, n_pages)
    mask_mod = _paged_mask_mod_on_buffers(window_left, window_right, page_size)
    block_mask = (q_len, n_pages * page_size, kv_num, kv_pages, full_num,
                  _at(pages, full_virtual), None, None, None, None, _BLOCK[0], page_size,
                  mask_mod)
    views = [query.unsqueeze(0).transpose(1, 2)] + [
        t.flatten(0, 1).unsqueeze(0).transpose(1, 2) for t in (key, value)]
    return _Packed(*views, block_mask,
                   (q_layout.doc, q_layout.end, physical_to_logical, seqused_k))


def _packed(query, key, value, cu_seq_q, cu_seq_k, window_left, window_right,
            seqused_k=None, block_table=None) -> _Packed:
    if block_table is not None:
        return _paged(query, key, value, cu_seq_q, window_left, window_right, seqused_k,
                      block_table)
    q_len, kv_len = query.shape[0], key.shape[0]
    lists = cu_seq_block_lists(cu_seq_q, cu_seq_k, q_len, kv_len, (window_left, window_right),
                               seqused_k, _BLOCK)
    block_mask = (q_len, kv_len, *lists, *_BLOCK, varlen_document_mask)
    views = [t.unsqueeze(0).transpose(1, 2) for t in (query, key, value)]
    return _Packed(*views, block_mask, _visible_keys(packed_layout(cu_seq_q, q_len), cu_seq_k,
                                                     window_left, window_right, seqused_k))


def _unpack(out: Tensor) -> Tensor:
    """``[1, H, T, E]`` -> ``[T, H, E]``, contiguous."""
    return out.squeeze(0).transpose(0, 1).contiguous()


def _forward(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, scale, window_left,
             window_right, seqused_k=None, block_table=None) -> Tuple[Tensor, Tensor]:
    """(out ``[Tq, Hq, Dv]``, lse ``[Hq, Tq]``) through the flex operator: the forward op's
    implementation (eager) and its decomposition (Inductor). Takes the op's arguments."""
    packed = _packed(query, key, value, cu_seq_q, cu_seq_k, window_left, window_right, seqused_k,
                     block_table)
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
                   window_right: int, seqused_k: Optional[Tensor] = None,
                   block_table: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """Packed attention: (out ``[Tq, Hq, Dv]``, lse ``[Hq, Tq]`` float32). Arguments are
    those of ``varlen_attn``, validated and resolved (``scale`` a float, the window as two
    ints). ``max_q`` / ``max_k`` are not needed by the computation."""
    with as_leaf_kernel():
        return _forward(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, scale, window_left,
                        window_right, seqused_k, block_table)


@varlen_attn_op.register_fake
def _varlen_attn_fake(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, scale, window_left,
                      window_right, seqused_k=None, block_table=None):
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
     seqused_k, block_table) = inputs
    if seqused_k is not None or block_table is not None:
        raise RuntimeError("varlen_attn: seqused_k and block_table are inference-only (no "
                           "backward); call it under torch.no_grad() or with inputs that do not "
                           "require grad")
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
    return (*grads,) + (None,) * 9


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
    paged = block_table is not None
    # With a block table key/value are pools of pages [n_pages, page_size, H, D].
    kv_layout, kv_dims = ("paged [n_pages, page_size, H, D]", 4) if paged else ("packed [T, H, D]", 3)
    for name, tensor, layout, dims in (("query", query, "packed [T, H, D]", 3),
                                       ("key", key, kv_layout, kv_dims),
                                       ("value", value, kv_layout, kv_dims)):
        if not isinstance(tensor, Tensor) or tensor.dim() != dims:
            shape = tuple(tensor.shape) if isinstance(tensor, Tensor) else type(tensor).__name__
            raise ValueError(f"{fn}: {name} must be a {layout} tensor, got {shape}")
    if not (query.dtype == key.dtype == value.dtype) or not query.dtype.is_floating_point:
        raise ValueError(f"{fn}: query, key and value must share one floating dtype, got "
                         f"{query.dtype}, {key.dtype} and {value.dtype}")
    if paged and key.shape[:3] != value.shape[:3]:
        raise ValueError(f"{fn}: key {tuple(key.shape)} and value {tuple(value.shape)} must have "
                         f"the same number of pages, page size and heads")
    if not paged and key.shape[:2] != value.shape[:2]:
        raise ValueError(f"{fn}: key {tuple(key.shape)} and value {tuple(value.shape)} must have "
                         f"the same number of tokens and heads")
    if query.shape[-1] != key.shape[-1]:
        raise ValueError(f"{fn}: query and key must have the same head dim, got "
                         f"{query.shape[-1]} and {key.shape[-1]}")
    heads_q, heads_k = query.shape[1], key.shape[-2]
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
    placed = [query, key, value, cu_seq_q, cu_seq_k]
    if paged:
        if seqused_k is None:
            raise ValueError(f"{fn}: block_table requires seqused_k (the number of keys of each "
                             f"sequence; the last page is usually not full)")
        if (not isinstance(block_table, Tensor) or block_table.dtype != torch.int32
                or block_table.dim() != 2 or block_table.shape[0] != cu_seq_q.shape[0] - 1
                or block_table.shape[1] == 0):
            got = (f"{block_table.dtype} tensor of shape {tuple(block_table.shape)}"
                   if isinstance(block_table, Tensor) else type(block_table).__name__)
            raise ValueError(f"{fn}: block_table must be an int32 [N = {cu_seq_q.shape[0] - 1}, "
                             f"max_pages_per_seq >= 1] tensor (the pages of each sequence, in "
                             f"logical order), got {got}")
        placed += [seqused_k, block_table]
    devices = {t.device for t in placed}
    if len(devices) != 1:
        names = "query, key, value, cu_seq_q, cu_seq_k" + (", seqused_k, block_table" if paged
                                                           else "")
        raise ValueError(f"{fn}: {names} must be on one device, got "
                         f"{sorted(map(str, devices))}")
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


def _check_paged_values(key, max_k, seqused_k, block_table) -> None:
    """Value checks of a paged call (eager mode only): each sequence's used keys fit its
    table row and ``max_k``, and its used pages exist and are distinct."""
    n_pages, page_size = key.shape[0], key.shape[1]
    width = block_table.shape[1]
    used = seqused_k.tolist()
    if min(used) < 0 or max(used) > width * page_size:
        raise ValueError(f"varlen_attn: seqused_k must lie between 0 and the {width} pages x "
                         f"{page_size} tokens a block_table row addresses, got {used}")
    if max(used) > max_k:
        raise ValueError(f"varlen_attn: max_k={max_k} is smaller than the longest sequence in "
                         f"seqused_k ({max(used)})")
    for doc, (row, count) in enumerate(zip(block_table.tolist(), used)):
        pages = row[:-(-count // page_size)]
        if any(not 0 <= page < n_pages for page in pages) or len(set(pages)) != len(pages):
            raise ValueError(f"varlen_attn: block_table row {doc} must name {len(pages)} distinct "
                             f"pages in [0, {n_pages}) for its seqused_k={count} keys, got {pages}")


def _check_values(query, key, cu_seq_q, cu_seq_k, max_q, max_k, seqused_k, block_table) -> None:
    _check_offsets("cu_seq_q", cu_seq_q, query.shape[0], max_q, "max_q")
    if block_table is not None:  # cu_seq_k is not read: seqused_k gives the key counts
        _check_paged_values(key, max_k, seqused_k, block_table)
        return
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
    q_layout = packed_layout(cu_seq_q, q_len)
    kv_layout = packed_layout(cu_seq_k, kv_len, seqused_k)
    # The user's mod may drop any pair, so no block is known to be full.
    lists = cu_seq_block_lists(cu_seq_q, cu_seq_k, q_len, kv_len, window, seqused_k, _BLOCK,
                               allow_full=mask_mod is None)
    q_local = torch.arange(q_len, dtype=torch.int32, device=query.device) - q_layout.start
    kv_local = torch.arange(kv_len, dtype=torch.int32, device=query.device) - kv_layout.start
    first, last = _visible_keys(q_layout, cu_seq_k, left, right, seqused_k)

    def varlen_mask(b, h, q_idx, kv_idx):
        keep = _in_range(q_idx, kv_idx, first, last)
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
        block_table: int32 ``[N, max_pages_per_seq]``, a paged KV cache (inference only):
            key / value are then pools of pages ``[n_pages, page_size, Hkv, D]`` and
            sequence ``i``'s logical key ``j`` is row ``j % page_size`` of page
            ``block_table[i, j // page_size]``. Requires ``seqused_k`` (the key counts;
            ``cu_seq_k`` is then not read). A page may serve several sequences, once each.
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
        _check_values(query, key, cu_seq_q, cu_seq_k, max_q, max_k, seqused_k, block_table)
    if scale is None:
        scale = 1.0 / math.sqrt(query.shape[-1])
    if score_mod is None and mask_mod is None:
        out, lse = varlen_attn_op(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k,
                                  float(scale), *window, seqused_k, block_table)
    elif block_table is not None:
        raise NotImplementedError("varlen_attn: score_mod / mask_mod with block_table are not "
                                  "supported; gather the pages into packed key/value tensors")
    else:
        out, lse = _attend_with_mods(query, key, value, cu_seq_q, cu_seq_k, scale, window,
                                     seqused_k, enable_gqa, score_mod, mask_mod)
    if return_aux is not None and return_aux.lse:
        return out, lse
    return out
