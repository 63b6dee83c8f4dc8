"""Pictures of masks and attention, drawn with matplotlib to PNG files.

Three kinds, each from an array that a ``*_grid`` function returns (so the numbers a
picture shows can be checked without reading pixels):

- :func:`plot_block_mask`: the block grid of a BlockMask, each block full, partial or
  empty in its own colour (:func:`block_kinds`);
- :func:`plot_mask_mod`: a mask_mod at token level over a window of a few hundred tokens
  (:func:`mask_mod_window`);
- :func:`plot_attention`: the scores or probabilities of given ``query`` / ``key`` after a
  score_mod and an optional block mask (:func:`attention_window`).

Axes are in tokens. matplotlib is optional (``pip install 'inductor_flex[pictures]'``) and
imported only when a picture is drawn; only its object-oriented ``Figure`` is used, so
pyplot's global state and the user's backend are left alone.
"""
import math
from typing import Callable, Optional, Tuple

import torch
from torch import Tensor

from ._block_lists import listed_to_dense
from ._mods import mask_mod_grid, score_mod_grid
from .block_mask import BlockMask

__all__ = [
    "BLOCK_COLOURS",
    "EMPTY_BLOCK",
    "FULL_BLOCK",
    "PARTIAL_BLOCK",
    "attention_window",
    "block_kinds",
    "mask_mod_window",
    "plot_attention",
    "plot_block_mask",
    "plot_mask_mod",
]

# Values of the block_kinds grid; also the index into BLOCK_COLOURS and the legend order.
EMPTY_BLOCK, PARTIAL_BLOCK, FULL_BLOCK = 0, 1, 2
BLOCK_COLOURS = ("#eeeeee", "#f4a259", "#2a6f97")  # empty: light grey, partial: orange, full: blue
_BLOCK_LABELS = ("empty (skipped)", "partial (mask_mod applied)", "full (mask_mod skipped)")
_KEPT_COLOURS = ("#eeeeee", "#2a6f97")  # masked, kept
# A token window is evaluated and drawn whole; this keeps it a picture, not a dense mask.
MAX_WINDOW_TOKENS = 4096


def new_figure(figsize: Tuple[float, float], dpi: int):
    """A matplotlib Figure detached from pyplot, or an ImportError that names the extra."""
    try:
        from matplotlib.figure import Figure
    except ImportError as error:
        raise ImportError(
            "inductor_flex.visualize draws with matplotlib, which is not installed: "
            "pip install 'inductor_flex[pictures]' (or pip install matplotlib)") from error
    return Figure(figsize=figsize, dpi=dpi, layout="constrained")


def _entry(name: str, value: int, size: int) -> int:
    """``value`` as an index into a dim of ``size`` entries; a broadcast (size 1) dim
    serves every index."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if size == 1:
        return 0
    if not 0 <= value < size:
        raise ValueError(f"{name}={value} is out of range for {size} entries")
    return value


def _window(name: str, window, length: Optional[int]) -> Tuple[int, int]:
    """``(start, stop)`` of a token range given as ``(start, stop)`` or a length from 0."""
    start, stop = (0, window) if isinstance(window, int) else tuple(window)
    if not (isinstance(start, int) and isinstance(stop, int)) or not 0 <= start < stop:
        raise ValueError(f"{name} must be a length > 0 or (start, stop) with 0 <= start < stop, "
                         f"got {window!r}")
    if length is not None and stop > length:
        raise ValueError(f"{name}={window!r} reaches past the sequence of {length} tokens")
    if stop - start > MAX_WINDOW_TOKENS:
        raise ValueError(f"{name}={window!r} spans {stop - start} tokens; a picture takes at "
                         f"most {MAX_WINDOW_TOKENS}")
    return start, stop


def _save(figure, path):
    if path is not None:
        figure.savefig(path)
    return figure


# --------------------------------------------------------------------------------------
# Block grid
# --------------------------------------------------------------------------------------


def block_kinds(block_mask: BlockMask, batch: int = 0, head: int = 0) -> Tensor:
    """int8 ``[n_q_blocks, n_kv_blocks]`` of one (batch, head) entry: ``FULL_BLOCK``,
    ``PARTIAL_BLOCK`` or ``EMPTY_BLOCK`` per block, as the kernels will treat it."""
    if not isinstance(block_mask, BlockMask):
        raise TypeError(f"block_mask must be an inductor_flex BlockMask, got {type(block_mask).__name__}")
    if block_mask.kv_indices.dim() != 4:
        raise ValueError("block_mask must have [B, H, n_q_blocks, n_kv_blocks] block lists; "
                         f"this one's kv_indices has shape {tuple(block_mask.kv_indices.shape)}")
    B, H, _, num_cols = block_mask.kv_indices.shape
    entry = (_entry("batch", batch, B), _entry("head", head, H))
    kinds = listed_to_dense(block_mask.kv_num_blocks[entry], block_mask.kv_indices[entry],
                            num_cols).to(torch.int8) * PARTIAL_BLOCK
    if block_mask.full_kv_num_blocks is not None:
        full = listed_to_dense(block_mask.full_kv_num_blocks[entry],
                               block_mask.full_kv_indices[entry], num_cols)
        kinds[full] = FULL_BLOCK
    return kinds.cpu()


def plot_block_mask(block_mask: BlockMask, path=None, *, batch: int = 0, head: int = 0,
                    title: Optional[str] = None, figsize=(5.0, 5.0), dpi: int = 100, ax=None):
    """Draw the block grid of ``block_mask`` (one batch/head entry); full, partial and empty
    blocks in the three ``BLOCK_COLOURS``, with a legend. Axes in tokens.

    Draws on ``ax`` when given, else on a new Figure of ``figsize`` inches at ``dpi``.
    Saves a PNG at ``path`` when given. Returns the Figure."""
    kinds = block_kinds(block_mask, batch, head)
    q_len, kv_len = block_mask.seq_lengths
    q_block, kv_block = block_mask.BLOCK_SIZE
    figure = ax.figure if ax is not None else new_figure(figsize, dpi)
    ax = ax if ax is not None else figure.subplots()
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    n_rows, n_cols = kinds.shape
    # Block (i, j) covers query tokens [i * q_block, (i + 1) * q_block), likewise for keys.
    ax.imshow(kinds.numpy(), cmap=ListedColormap(BLOCK_COLOURS), vmin=0, vmax=len(BLOCK_COLOURS) - 1,
              interpolation="nearest", aspect="auto",
              extent=(0, n_cols * kv_block, n_rows * q_block, 0))
    ax.set_xlim(0, kv_len)
    ax.set_ylim(q_len, 0)
    if n_rows <= 64 and n_cols <= 64:  # block edges, where they are far enough apart to see
        ax.set_xticks([j * kv_block for j in range(n_cols + 1)], minor=True)
        ax.set_yticks([i * q_block for i in range(n_rows + 1)], minor=True)
        ax.grid(which="minor", color="white", linewidth=0.5)
        ax.tick_params(which="minor", length=0)
    ax.set_xlabel("key token")
    ax.set_ylabel("query token")
    counts = [int((kinds == kind).sum()) for kind in range(len(BLOCK_COLOURS))]
    ax.set_title(title if title is not None else
                 f"{block_mask.shape[2]}x{block_mask.shape[3]} tokens, blocks {q_block}x{kv_block}, "
                 f"sparsity {block_mask.sparsity():.1f}%", fontsize=9)
    ax.legend(handles=[Patch(facecolor=colour, edgecolor="grey", label=f"{label}: {count}")
                       for colour, label, count in zip(BLOCK_COLOURS, _BLOCK_LABELS, counts)],
              loc="upper right", fontsize=7, framealpha=0.9)
    return _save(figure, path)


# --------------------------------------------------------------------------------------
# Token-level mask
# --------------------------------------------------------------------------------------


def mask_mod_window(mask_mod: Callable, q_window=256, kv_window=None, *, batch: int = 0,
                    head: int = 0) -> Tensor:
    """bool ``[q_stop - q_start, kv_stop - kv_start]``: ``mask_mod`` over a token window.

    Windows are a length (from token 0) or ``(start, stop)``; ``kv_window`` defaults to
    ``q_window``."""
    if not callable(mask_mod):
        raise TypeError(f"mask_mod must be callable, got {type(mask_mod).__name__}")
    q_start, q_stop = _window("q_window", q_window, None)
    kv_start, kv_stop = _window("kv_window", q_window if kv_window is None else kv_window, None)
    b, h = torch.tensor([batch]), torch.tensor([head])
    return mask_mod_grid(mask_mod, b, h, torch.arange(q_start, q_stop),
                         torch.arange(kv_start, kv_stop))[0, 0]


def plot_mask_mod(mask_mod: Callable, path=None, *, q_window=256, kv_window=None, batch: int = 0,
                  head: int = 0, title: Optional[str] = None, figsize=(5.0, 5.0), dpi: int = 100,
                  ax=None):
    """Draw ``mask_mod`` token by token over a window (see :func:`mask_mod_window`): kept
    positions dark, masked light. Axes in tokens. Returns the Figure; saves at ``path``."""
    kept = mask_mod_window(mask_mod, q_window, kv_window, batch=batch, head=head)
    q_start, q_stop = _window("q_window", q_window, None)
    kv_start, kv_stop = _window("kv_window", q_window if kv_window is None else kv_window, None)
    figure = ax.figure if ax is not None else new_figure(figsize, dpi)
    ax = ax if ax is not None else figure.subplots()
    from matplotlib.colors import ListedColormap

    ax.imshow(kept.to(torch.uint8).numpy(), cmap=ListedColormap(_KEPT_COLOURS), vmin=0, vmax=1,
              interpolation="nearest", aspect="auto", extent=(kv_start, kv_stop, q_stop, q_start))
    ax.set_xlabel("key token")
    ax.set_ylabel("query token")
    name = getattr(mask_mod, "__name__", type(mask_mod).__name__)
    ax.set_title(title if title is not None else
                 f"{name}: {100.0 * kept.float().mean().item():.1f}% kept", fontsize=9)
    return _save(figure, path)


# --------------------------------------------------------------------------------------
# Scores and probabilities
# --------------------------------------------------------------------------------------


def _token_keep(block_mask: BlockMask, batch: int, head: int, q: Tensor, kv: Tensor) -> Tensor:
    """bool ``[len(q), len(kv)]``: kept where the block is full, or partial and the
    mask_mod keeps the pair (what the kernels compute)."""
    kinds = block_kinds(block_mask, batch, head)
    q_block, kv_block = block_mask.BLOCK_SIZE
    kind = kinds[(q // q_block)[:, None], (kv // kv_block)[None, :]]
    device = block_mask.kv_indices.device  # where the mask_mod's captured tensors live
    b = torch.tensor([_entry("batch", batch, block_mask.kv_indices.shape[0])], device=device)
    h = torch.tensor([_entry("head", head, block_mask.kv_indices.shape[1])], device=device)
    by_mod = mask_mod_grid(block_mask.mask_mod, b, h, q.to(device), kv.to(device))[0, 0].cpu()
    return (kind == FULL_BLOCK) | ((kind == PARTIAL_BLOCK) & by_mod)


def attention_window(query: Tensor, key: Tensor, score_mod: Optional[Callable] = None,
                     block_mask: Optional[BlockMask] = None, *, scale: Optional[float] = None,
                     batch: int = 0, head: int = 0, q_window=None, kv_window=None,
                     probabilities: bool = True) -> Tensor:
    """float32 ``[q_stop - q_start, kv_stop - kv_start]`` of one (batch, query head):
    the scores ``score_mod(scale * q @ k)`` with masked positions at ``-inf``, or (with
    ``probabilities``) their softmax over each query's whole row of keys, so the window
    shows the weights attention really uses. ``query`` is ``[B, Hq, L, E]``, ``key``
    ``[B or 1, Hkv, S, E]`` (grouped-query heads share a key head). Windows as in
    :func:`mask_mod_window`; ``q_window`` defaults to the first 256 queries,
    ``kv_window`` to all keys (at most ``MAX_WINDOW_TOKENS``)."""
    for name, tensor in (("query", query), ("key", key)):
        if not isinstance(tensor, Tensor) or tensor.dim() != 4:
            raise ValueError(f"{name} must be a 4-d tensor [B, H, tokens, E], got "
                             f"{tuple(tensor.shape) if isinstance(tensor, Tensor) else type(tensor).__name__}")
    B, Hq, L, E = query.shape
    Bk, Hkv, S, Ek = key.shape
    if E != Ek or Hq % Hkv or Bk not in (1, B):
        raise ValueError(f"query {tuple(query.shape)} and key {tuple(key.shape)} do not fit: "
                         f"need equal E, Hq a multiple of Hkv, key batch 1 or B")
    q_start, q_stop = _window("q_window", min(L, 256) if q_window is None else q_window, L)
    kv_start, kv_stop = _window("kv_window", min(S, MAX_WINDOW_TOKENS) if kv_window is None
                                else kv_window, S)
    batch, head = _entry("batch", batch, B), _entry("head", head, Hq)
    if block_mask is not None and tuple(block_mask.seq_lengths) != (L, S):
        raise ValueError(f"block_mask is for {tuple(block_mask.seq_lengths)} tokens, "
                         f"query/key have ({L}, {S})")
    scale = 1.0 / math.sqrt(E) if scale is None else scale
    # Evaluated where the inputs are: a score_mod's captured tensors live there too.
    device = query.device
    q_idx, kv_idx = torch.arange(q_start, q_stop, device=device), torch.arange(S, device=device)
    rows = query[batch, head, q_start:q_stop].detach().float()
    keys = key[batch if Bk > 1 else 0, head // (Hq // Hkv)].detach().float()
    scores = (scale * rows @ keys.T)[None, None]
    if score_mod is not None:
        scores = score_mod_grid(score_mod, scores, torch.tensor([batch], device=device),
                                torch.tensor([head], device=device), q_idx, kv_idx).float()
    scores = scores[0, 0].cpu()
    if block_mask is not None:
        keep = _token_keep(block_mask, batch, head, q_idx.cpu(), kv_idx.cpu())
        scores = scores.masked_fill(~keep, float("-inf"))
    if probabilities:
        # A row that keeps nothing gets zeros, as flex_attention's output does.
        row_max = scores.amax(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).min)
        weights = (scores - row_max).exp()
        scores = weights / weights.sum(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    return scores[:, kv_start:kv_stop]


def plot_attention(query: Tensor, key: Tensor, path=None, *, score_mod: Optional[Callable] = None,
                   block_mask: Optional[BlockMask] = None, scale: Optional[float] = None,
                   batch: int = 0, head: int = 0, q_window=None, kv_window=None,
                   probabilities: bool = True, vmax: Optional[float] = None,
                   title: Optional[str] = None, figsize=(5.6, 5.0), dpi: int = 100, ax=None):
    """Draw :func:`attention_window` as a heat map with a colour bar (masked positions
    blank). ``vmax`` caps the colour scale (the first queries, which see few keys, would
    otherwise take all of it). Axes in tokens. Returns the Figure; saves at ``path``."""
    values = attention_window(query, key, score_mod, block_mask, scale=scale, batch=batch,
                              head=head, q_window=q_window, kv_window=kv_window,
                              probabilities=probabilities)
    q_start = 0 if q_window is None else _window("q_window", q_window, None)[0]
    kv_start = 0 if kv_window is None else _window("kv_window", kv_window, None)[0]
    figure = ax.figure if ax is not None else new_figure(figsize, dpi)
    ax = ax if ax is not None else figure.subplots()
    import numpy

    shown = values.numpy()
    if not probabilities:
        shown = numpy.ma.masked_invalid(shown)  # -inf (masked) is drawn as background
    n_q, n_kv = shown.shape
    image = ax.imshow(shown, cmap="viridis", interpolation="nearest", aspect="auto", vmax=vmax,
                      extent=(kv_start, kv_start + n_kv, q_start + n_q, q_start))
    figure.colorbar(image, ax=ax, label="probability" if probabilities else "score",
                    extend="neither" if vmax is None else "max")
    ax.set_xlabel("key token")
    ax.set_ylabel("query token")
    what = "probabilities" if probabilities else "scores"
    name = "" if score_mod is None else f" after {getattr(score_mod, '__name__', 'score_mod')}"
    ax.set_title(title if title is not None else f"attention {what}{name}, head {head}", fontsize=9)
    return _save(figure, path)
