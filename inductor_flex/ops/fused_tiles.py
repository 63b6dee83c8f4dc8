"""The dense path's per-tile elementwise work, written to be compiled into one CPU kernel.

``dense.py`` spends two matmuls per score tile in the forward and five in the backward;
everything between them (score_mod, mask, softmax and its statistics; in the backward the
probabilities again, the softmax gradient, the score_mod's vjp and its buffer gradients)
is elementwise or a row reduction over the tile. As separate ATen ops that is a handful
of passes over a tile much larger than the caches. The functions here state the same
math as one tensor program each, which ``torch.compile`` (Inductor's C++ backend) turns
into one loop nest per tile: a row at a time, its reductions and its outputs while the
row is in cache.

``TileKernels`` holds the compiled pair for one score_mod (and score gradient): one
compile per mod serving every tile width (``dynamic=True``), each kernel its own code
object so that Dynamo's per-code recompile limit counts one mod, not every mod of the
process. A kernel that fails to compile is not tried again (debug log) and the caller
takes the plain path. ``FusedTiles`` binds a ``TileKernels`` to one call's lifted mod
constants; the compiled extern ops (``lowering/extern.py``) pass one to the dense kernels
on the CPU.

Numerics are those of the plain path: scores and statistics in the working dtype,
probabilities (and dS) rounded to the input dtype before their matmuls in float16 and
bfloat16. The backward reads the forward's float32 ``lse`` instead of recomputing the
row statistics (so it is not used for float64 inputs, whose exact lse is not kept).
"""
import logging
import math
import types
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from .._compat import inductor_with_decompositions
from .._mods import score_gradient_grid, score_mod_grid

log = logging.getLogger("inductor_flex")


def _modified(score_mod: Optional[Callable], raw: Tensor, b, h, q_idx, kv_idx,
              buffers: Sequence) -> Tensor:
    if score_mod is None:
        return raw
    return score_mod_grid(score_mod, raw, b, h, q_idx, kv_idx, buffers).to(raw.dtype)


def _rounded(tile: Tensor, dtype: Optional[torch.dtype]) -> Tensor:
    return tile if dtype is None else tile.to(dtype).to(tile.dtype)


def forward_tile(score_mod: Optional[Callable], raw: Tensor, b: Tensor, h: Tensor,
                 q_idx: Tensor, kv_idx: Tensor, buffers: tuple, keep: Optional[Tensor],
                 probs_dtype: torch.dtype,
                 round_dtype: Optional[torch.dtype]):
    """Softmax of the kept modified scores of ``raw [B, H, rows, columns]``.

    ``keep``: 1 where a score is kept, 0 where dropped (``_Tile.kernel_mask``; None: keep
    everything).
    Returns ``(probs, row_max, lse)``, the last two with a trailing 1; probs rounded to
    ``round_dtype`` (if any) and given in ``probs_dtype``. A row that keeps nothing has
    zero probs and row_max = lse = -inf.
    """
    scores = _modified(score_mod, raw, b, h, q_idx, kv_idx, buffers)
    if keep is not None:
        scores = torch.where(keep > 0, scores, -math.inf)
    row_max = scores.amax(-1, keepdim=True)
    # Shift by 0 where the row keeps nothing: exp gives zeros there, not NaNs.
    shift = torch.where(row_max == -math.inf, 0.0, row_max)
    exps = torch.exp(scores - shift)
    total = exps.sum(-1, keepdim=True)
    probs = torch.where(total > 0, exps / total, 0.0)
    lse = shift + torch.log(total)
    return _rounded(probs, round_dtype).to(probs_dtype), row_max, lse


def backward_tile(score_mod: Optional[Callable], score_gradient: Optional[Callable],
                  raw: Tensor, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor,
                  buffers: tuple, score_constants: tuple, gradient_constants: tuple,
                  grad_positions: tuple, wanted_buffers: tuple, keep: Optional[Tensor],
                  lse: Tensor, grad_probs: Tensor,
                  row_dot: Tensor, round_dtype: Optional[torch.dtype]):
    """One tile of the backward, from the raw scores and ``grad_probs`` (dO V^T).

    The score_mod takes ``buffers`` then ``score_constants``; the buffers at
    ``grad_positions`` are replaced by ``wanted_buffers``, whose gradients are returned.
    ``score_gradient`` (called as ``score_gradient_grid`` calls it, with ``buffers`` then
    ``gradient_constants``) gives the score gradient; when None, the score_mod's own vjp
    does. ``lse`` and ``row_dot`` (rowsum(dO * out) - dlse) end in a 1.

    Returns ``(probs, grad_raw, buffer_grads)``: P rounded for ``P^T dO``, the raw
    scores' gradient (0 where dropped) rounded for its two matmuls, and a tuple.
    """
    def modify(raw_scores, *wanted):
        merged = list(buffers)
        for position, buffer in zip(grad_positions, wanted):
            merged[position] = buffer
        return _modified(score_mod, raw_scores, b, h, q_idx, kv_idx,
                         tuple(merged) + score_constants)

    buffer_vjp = raw_vjp = None
    if score_mod is None:
        scores = raw
    elif score_gradient is None:
        scores, raw_vjp = torch.func.vjp(modify, raw, *wanted_buffers)
    elif wanted_buffers:
        scores, buffer_vjp = torch.func.vjp(lambda *wanted: modify(raw, *wanted), *wanted_buffers)
    else:
        scores = modify(raw)
    probs = torch.where(lse == -math.inf, 0.0, torch.exp(scores - lse))
    if keep is not None:
        probs = torch.where(keep > 0, probs, 0.0)
    grad_scores = probs * (grad_probs - row_dot)
    buffer_grads = ()
    if score_mod is None:
        grad_raw = grad_scores
    elif raw_vjp is not None:
        grad_raw, *buffer_grads = raw_vjp(grad_scores)
    else:
        grad_raw = score_gradient_grid(score_gradient, raw, b, h, q_idx, kv_idx, grad_scores,
                                       buffers + gradient_constants)
        if buffer_vjp is not None:
            buffer_grads = buffer_vjp(grad_scores)
    if keep is not None:
        # A dropped score gives nothing, even where the mod's derivative is not finite.
        grad_raw = torch.where(keep > 0, grad_raw, 0.0)
    return (_rounded(probs, round_dtype), _rounded(grad_raw.to(raw.dtype), round_dtype),
            tuple(buffer_grads))


def _own_code_copy(function: Callable) -> Callable:
    """``function`` with a code object of its own: Dynamo caches (and limits recompiles)
    per code object, so each mod's kernels count apart."""
    return types.FunctionType(function.__code__.replace(), function.__globals__,
                              function.__name__, function.__defaults__, function.__closure__)


def _tanh_from_exp(x: Tensor):
    """float32 tanh in a handful of vector instructions (the Cephes recipe): an odd
    polynomial below |x| = 0.625, ``1 - 2 / (exp(2|x|) + 1)`` above (no cancellation
    there: the fraction is below 0.45). Relative error at most 1.2 float32 epsilons
    (the C++ backend's vector tanh, Sleef's: 1.0) at about half the cost: that tanh was
    most of a softcap tile's time (docs/kernels.md, CPU section). NaN, the infinities and
    the sign of zero come out as tanh's. Other dtypes keep Inductor's tanh."""
    if x.dtype != torch.float32:
        return NotImplemented
    magnitude = x.abs()
    square = x * x
    odd_series = ((((-5.70498872745e-3 * square + 2.06390887954e-2) * square
                    - 5.37397155531e-2) * square + 1.33314422036e-1) * square
                  - 3.33332819422e-1) * square * x + x
    from_exp = 1.0 - 2.0 / (torch.exp(2.0 * magnitude) + 1.0)
    return torch.where(magnitude < 0.625, odd_series, from_exp).copysign(x)


# Inductor's decompositions for the tile kernels only, not for the user's other compiles.
_TILE_DECOMPOSITIONS = {torch.ops.aten.tanh.default: _tanh_from_exp}


class _CompiledOnce:
    """``torch.compile`` of ``function`` (dynamic shapes, the tile decompositions), or None
    for good after one failure."""

    def __init__(self, function: Callable, what: str):
        self.what = what
        self.failed = False
        self.compiled = torch.compile(_own_code_copy(function), dynamic=True, fullgraph=True,
                                      backend=inductor_with_decompositions(_TILE_DECOMPOSITIONS))

    def __call__(self, *args):
        if self.failed:
            return None
        try:
            return self.compiled(*args)
        except Exception as error:  # any compile failure: the plain path serves
            self.failed = True
            log.debug("inductor_flex: fused %s tile kernel not compiled, plain path serves: %s",
                      self.what, error)
            return None


# A call whose score matrix (B x Hq x Q x KV) is at least this large takes the fused tile
# kernels; below it the one-off compile (seconds) does not pay.
FUSED_TILES_MIN_SCORES = 1 << 22


class TileKernels:
    """The compiled forward and backward tile kernels of one score_mod (None: the
    identity) and its score gradient (None: the score_mod's own vjp). Each compiles on
    first use."""

    def __init__(self, score_mod: Optional[Callable], score_gradient: Optional[Callable] = None):
        self.score_mod = score_mod
        self.score_gradient = score_gradient
        self._forward = self._backward = None

    def forward(self, *args):
        if self._forward is None:
            self._forward = _CompiledOnce(forward_tile, "forward")
        return self._forward(self.score_mod, *args)

    def backward(self, *args):
        if self._backward is None:
            self._backward = _CompiledOnce(backward_tile, "backward")
        return self._backward(self.score_mod, self.score_gradient, *args)


class FusedTiles:
    """``TileKernels`` bound to one call: the tensor constants lifted out of the score_mod
    and of the score gradient graph, appended to their buffers as ``lowering/extern.py``'s
    ``bound_mod`` does."""

    def __init__(self, kernels: TileKernels, score_constants: Sequence[Tensor] = (),
                 gradient_constants: Sequence[Tensor] = ()):
        self.kernels = kernels
        self.score_constants = tuple(score_constants)
        self.gradient_constants = tuple(gradient_constants)

    @staticmethod
    def worth_it(batch: int, q_heads: int, q_len: int, kv_len: int) -> bool:
        return batch * q_heads * q_len * kv_len >= FUSED_TILES_MIN_SCORES

    def forward(self, raw, b, h, q_idx, kv_idx, buffers, keep, probs_dtype, round_dtype):
        """``forward_tile``'s result, or None when the kernel is not available."""
        return self.kernels.forward(raw, b, h, q_idx, kv_idx,
                                    tuple(buffers) + self.score_constants, keep, probs_dtype,
                                    round_dtype)

    def backward(self, raw, b, h, q_idx, kv_idx, buffers, grad_positions, wanted_buffers,
                 keep, lse, grad_probs, row_dot, round_dtype):
        """``backward_tile``'s result, or None when the kernel is not available."""
        return self.kernels.backward(raw, b, h, q_idx, kv_idx, tuple(buffers),
                                     self.score_constants, self.gradient_constants,
                                     tuple(grad_positions),
                                     tuple(wanted_buffers), keep, lse, grad_probs,
                                     row_dot, round_dtype)
