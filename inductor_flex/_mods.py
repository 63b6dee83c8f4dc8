"""Evaluate a score_mod or mask_mod over a grid of indices.

User mods are written for one scalar position ``(b, h, q_idx, kv_idx)``. We run them over
a whole grid with four nested ``torch.vmap``s, so any code that is correct for scalars
(indexing captured tensors, ``torch.where``, ``h.new_zeros(h.shape)``) is correct here,
without materializing more than the grid asked for.

Mods that arrive as traced ``torch.fx.GraphModule``s may contain ops vmap has no batching
rule for; ``batchable`` gives the copy of such a graph that every vmap of a mod should run.
"""
import copy
import weakref
from typing import Callable, Sequence

import torch
import torch.fx
from torch import Tensor


def identity_score_mod(score: Tensor, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
    """The score_mod of a call that gives none: scores pass unchanged. (The keep-all
    mask_mod is the public ``noop_mask``.)"""
    return score


# AOT tracing with decompositions turns dtype casts into prims (from the decompositions of
# tanh_backward, gelu, softplus, ... and of every ``.float()``), and vmap has no batching
# rule for prims: it falls back to one call per grid element, orders of magnitude slower.
# Each entry maps such an op to an equivalent that vmap batches, as ``(target, args,
# kwargs)`` built from the op's own arguments.
BATCHABLE_EQUIVALENTS: dict[Callable, Callable] = {
    torch.ops.prims.convert_element_type.default:
        lambda a, dtype: (torch.ops.aten._to_copy.default, (a,), {"dtype": dtype}),
}

# Module -> its rewritten copy, or None when it has nothing to rewrite. Never the module
# itself: a value referring to its key would keep the entry alive forever.
_batchable_copies: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _needs_rewrite(node: torch.fx.Node) -> bool:
    return node.op == "call_function" and node.target in BATCHABLE_EQUIVALENTS


def batchable(graph_module: Callable) -> Callable:
    """``graph_module`` with every op of ``BATCHABLE_EQUIVALENTS`` replaced by its equivalent.

    Returns a rewritten copy (the original is left alone, others may hold it) when the graph
    has such ops, else ``graph_module`` itself; any mod that is not a ``GraphModule`` (plain
    Python, already batchable op by op) comes back as is. Cached per module object.
    """
    if not isinstance(graph_module, torch.fx.GraphModule):
        return graph_module
    if graph_module in _batchable_copies:
        rewritten = _batchable_copies[graph_module]
        return graph_module if rewritten is None else rewritten
    rewritten = None
    if any(_needs_rewrite(node) for node in graph_module.graph.nodes):
        graph = copy.deepcopy(graph_module.graph)
        for node in graph.nodes:
            if _needs_rewrite(node):
                equivalent = BATCHABLE_EQUIVALENTS[node.target]
                node.target, node.args, node.kwargs = equivalent(*node.args, **node.kwargs)
        # Same attributes (tensor constants, submodules) as the original, new code.
        rewritten = torch.fx.GraphModule(graph_module, graph, graph_module.__class__.__name__)
    _batchable_copies[graph_module] = rewritten
    return graph_module if rewritten is None else rewritten


def _nest_vmaps(fn: Callable, has_score: bool, num_buffers: int, has_grad: bool = False) -> Callable:
    # Positions of b, h, q_idx, kv_idx in the mod's argument list.
    first_index = 1 if has_score else 0
    # A score gradient function takes the incoming gradient after the indices.
    after_indices = (0,) if has_grad else ()
    buffers = (None,) * num_buffers
    # Innermost first: kv_idx, then q_idx, h, b. The score (when present) is batched at
    # every level, one grid dimension peeled off per level from the outside in.
    for index_position in (3, 2, 1, 0):
        in_dims = [None] * (first_index + 4)
        in_dims[first_index + index_position] = 0
        if has_score:
            in_dims[0] = 0
        fn = torch.vmap(fn, in_dims=tuple(in_dims) + after_indices + buffers, out_dims=0)
    return fn


def _grid_indices(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor):
    return tuple(t.to(torch.int32) for t in (b, h, q_idx, kv_idx))


def mask_mod_grid(mask_mod: Callable, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor,
                  buffers: Sequence[Tensor] = ()) -> Tensor:
    """``mask_mod`` at every ``(b, h, q, kv)`` of the 1-D index vectors: bool ``[B, H, Q, KV]``."""
    grid = _nest_vmaps(batchable(mask_mod), has_score=False, num_buffers=len(buffers))
    out = _checked_mask(mask_mod, grid(*_grid_indices(b, h, q_idx, kv_idx), *buffers), q_idx.device)
    shape = (b.numel(), h.numel(), q_idx.numel(), kv_idx.numel())
    return out.expand(shape)


def mask_mod_tiles(mask_mod: Callable, b: Tensor, h: Tensor, q_tiles: Tensor, kv_tiles: Tensor,
                   buffers: Sequence[Tensor] = ()) -> Tensor:
    """``mask_mod`` over T grids in one call: grid t is ``mask_mod_grid`` of ``b``, ``h``,
    ``q_tiles[t]`` and ``kv_tiles[t]`` (``q_tiles [T, R]``, ``kv_tiles [T, C]``). Returns bool
    ``[T, B, H, R, C]``. One vmap call for many (query block, kv block) tiles, where one per
    tile would cost more in vmap's Python than the mask itself."""
    grid = _nest_vmaps(batchable(mask_mod), has_score=False, num_buffers=len(buffers))
    tiles = torch.vmap(grid, in_dims=(None, None, 0, 0) + (None,) * len(buffers), out_dims=0)
    b, h, q_tiles, kv_tiles = _grid_indices(b, h, q_tiles, kv_tiles)
    out = _checked_mask(mask_mod, tiles(b, h, q_tiles, kv_tiles, *buffers), q_tiles.device)
    return out.expand(q_tiles.shape[0], b.numel(), h.numel(), q_tiles.shape[1], kv_tiles.shape[1])


def _checked_mask(mask_mod: Callable, out, device) -> Tensor:
    out = torch.as_tensor(out, device=device)
    if out.dtype != torch.bool:
        # As PyTorch's create_block_mask: a nonzero int or float is no "keep"; the mod
        # most likely returns a score or an index by mistake.
        raise ValueError(
            f"mask_mod {getattr(mask_mod, '__name__', type(mask_mod).__name__)} returned "
            f"{out.dtype}; a mask_mod must return a bool tensor (True keeps the score), "
            f"e.g. a comparison such as q_idx >= kv_idx")
    return out


def score_mod_grid(score_mod: Callable, scores: Tensor, b: Tensor, h: Tensor, q_idx: Tensor,
                   kv_idx: Tensor, buffers: Sequence[Tensor] = ()) -> Tensor:
    """``score_mod`` applied to ``scores [B, H, Q, KV]`` at the matching index vectors."""
    grid = _nest_vmaps(batchable(score_mod), has_score=True, num_buffers=len(buffers))
    out = grid(scores, *_grid_indices(b, h, q_idx, kv_idx), *buffers)
    return torch.as_tensor(out, device=scores.device).expand(scores.shape)


def score_gradient_grid(score_gradient: Callable, scores: Tensor, b: Tensor, h: Tensor,
                        q_idx: Tensor, kv_idx: Tensor, grads: Tensor,
                        buffers: Sequence[Tensor] = ()) -> Tensor:
    """A score gradient function, called per position as ``(score, b, h, q_idx, kv_idx,
    grad, *buffers)`` (``ops.backward.score_gradient_graph``), over ``scores`` and ``grads``
    ``[B, H, Q, KV]`` at the matching index vectors."""
    grid = _nest_vmaps(batchable(score_gradient), has_score=True, num_buffers=len(buffers),
                       has_grad=True)
    out = grid(scores, *_grid_indices(b, h, q_idx, kv_idx), grads, *buffers)
    if isinstance(out, (tuple, list)):
        (out,) = out  # a reduced joint graph returns (grad_score,)
    return torch.as_tensor(out, device=scores.device).expand(scores.shape)


def score_mod_at(score_mod: Callable, scores: Tensor, b: Tensor, h: Tensor, q_idx: Tensor,
                 kv_idx: Tensor, buffers: Sequence[Tensor] = ()) -> Tensor:
    """``score_mod`` at a list of positions: ``scores`` and the four index vectors are 1-D
    of one length (position i is ``(b[i], h[i], q_idx[i], kv_idx[i])``). Used where only
    some positions of a grid may be evaluated (the kept ones of a mask)."""
    fn = torch.vmap(batchable(score_mod), in_dims=(0,) * 5 + (None,) * len(buffers), out_dims=0)
    out = fn(scores, *_grid_indices(b, h, q_idx, kv_idx), *buffers)
    return torch.as_tensor(out, device=scores.device).expand(scores.shape)
