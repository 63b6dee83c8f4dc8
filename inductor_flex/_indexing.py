"""Indexing a tensor with the mods' scalar index tensors, without reading their values.

A mod indexes captured tensors with its 0-d ``b, h, q_idx, kv_idx`` all the time
(``bias[b, h][q_idx]``). Plain ``Tensor.__getitem__`` reads a 0-d integer index as a
Python int (``.item()``), which no tracer can do. :func:`getitem_with_index_tensors`
computes the same result with ``aten.index``, so it traces, vmaps and differentiates;
:class:`index_with_tensors` routes ``__getitem__`` to it while a mod is traced. Dynamo's
capture rule and the operators' make_fx tracing both use these.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch.overrides import TorchFunctionMode

__all__ = ["getitem_with_index_tensors", "index_with_tensors", "tensor_index_parts"]




def tensor_index_parts(index: Any) -> Optional[tuple]:
    """The index as a tuple when it holds an integer tensor and nothing we cannot
    translate (ints, slices, Ellipsis and integer tensors only); otherwise None."""
    parts = index if isinstance(index, tuple) else (index,)
    holds_tensor = False
    for part in parts:
        if isinstance(part, torch.Tensor):
            if part.dtype == torch.bool or part.is_floating_point() or part.is_complex():
                return None
            holds_tensor = True
        elif isinstance(part, bool):
            return None
        elif isinstance(part, (int, torch.SymInt, slice)) or part is Ellipsis:
            continue
        else:
            return None
    return parts if holds_tensor else None


def getitem_with_index_tensors(tensor: torch.Tensor, index: Any) -> torch.Tensor:
    """``tensor[index]`` for an index that holds integer tensors, computed with
    ``aten.index`` so the index values are never read on the host.

    Matches ``Tensor.__getitem__``, which reads a 0-d integer tensor as an int: ints
    (and 0-d tensors, when the index also holds tensors of higher rank) select and drop
    their dimension first, slices narrow theirs, and the remaining tensors index the
    remaining dimensions together, with the usual advanced-indexing broadcast rules.
    When every tensor is 0-d (the mods' case) they are applied in one ``aten.index``;
    their broadcast shape is empty, so its placement rules change nothing.
    """
    parts = tensor_index_parts(index)
    if parts is None:
        raise ValueError(f"getitem_with_index_tensors: unsupported index {index!r}")
    if sum(part is Ellipsis for part in parts) > 1:
        raise IndexError("an index can only have a single ellipsis ('...')")
    consumed = sum(part is not Ellipsis for part in parts)
    if consumed > tensor.dim():
        raise IndexError(
            f"too many indices for tensor of dimension {tensor.dim()} (got {consumed})")
    expanded = []
    for part in parts:
        if part is Ellipsis:
            expanded.extend([slice(None)] * (tensor.dim() - consumed))
        else:
            expanded.append(part)
    scalars_select = any(isinstance(p, torch.Tensor) and p.dim() > 0 for p in expanded)

    result = tensor
    tensor_indices: list = []  # one entry per kept dimension of `result`: tensor or None
    dim = 0
    for part in expanded:
        if isinstance(part, torch.Tensor) and not (scalars_select and part.dim() == 0):
            tensor_indices.append(part)
            dim += 1
        elif isinstance(part, torch.Tensor):  # a 0-d tensor acting as an int
            result = torch.ops.aten.index.Tensor(result, [None] * dim + [part])
        elif isinstance(part, slice):
            if part != slice(None):
                result = result[(slice(None),) * dim + (part,)]
            tensor_indices.append(None)
            dim += 1
        else:  # an int: select drops the dimension
            result = result.select(dim, part)
    while tensor_indices and tensor_indices[-1] is None:
        tensor_indices.pop()
    return torch.ops.aten.index.Tensor(result, tensor_indices)


class index_with_tensors(TorchFunctionMode):
    """Active while a mod is speculated: routes ``Tensor.__getitem__`` with integer
    index tensors to :func:`getitem_with_index_tensors`, so fake propagation never asks for an
    index's value."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.Tensor.__getitem__ and len(args) == 2 and not kwargs:
            if tensor_index_parts(args[1]) is not None:
                return getitem_with_index_tensors(args[0], args[1])
        return func(*args, **(kwargs or {}))
