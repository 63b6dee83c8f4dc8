"""What both operators' registrations share (forward.py, backward.py, autograd.py) and
the dense implementation reuses (dense.py): output layouts, tracing a mod into a make_fx
session, and the checks and unwrapping of functionalization."""
import contextlib
from typing import Any, Callable, Sequence

import torch
from torch import Tensor
from torch._higher_order_ops.utils import (
    UnsupportedAliasMutationException,
    _has_potential_branch_input_mutation,
    reenter_make_fx,
    unique_graph_id,
)
from torch.fx.experimental.proxy_tensor import ProxyTorchDispatchMode

from inductor_flex._block_lists import OperatorBlockMask
from inductor_flex._indexing import index_with_tensors

# Names of the submodules the proxy registration adds to a traced graph.
SCORE_MOD_PREFIX = "flex_score_mod"
MASK_MOD_PREFIX = "flex_mask_mod"


def empty_in_layout_of(like: Tensor, shape: Sequence, dtype: torch.dtype | None = None) -> Tensor:
    """An empty tensor of ``shape`` whose dims are laid out in the memory order of ``like``.

    ``shape`` has ``like``'s rank; only sizes may differ (an output with another head dim,
    say). The innermost dim of ``like`` (smallest stride; ties go to the later dim, as in a
    contiguous tensor) is innermost in the result, and so on outwards, densely packed.
    """
    ndim = like.dim()
    if len(shape) != ndim:
        raise ValueError(f"empty_in_layout_of: shape {tuple(shape)} must have rank {ndim}")
    strides = like.stride()
    # Innermost first. Python's sort is stable, so among equal strides the later dim,
    # listed first after the reversal, stays inner.
    fill_order = sorted(reversed(range(ndim)), key=lambda d: strides[d])
    new_strides = [0] * ndim
    running = 1
    for d in fill_order:
        new_strides[d] = running
        running = running * shape[d]
    return like.new_empty_strided(tuple(shape), tuple(new_strides),
                                  dtype=like.dtype if dtype is None else dtype)


def mod_example_args(query: Tensor, with_score: bool = True) -> list[Tensor]:
    """0-d example arguments of a mod: a score in the query's dtype (if ``with_score``),
    then int32 ``b, h, q_idx, kv_idx``, all on the query's device."""
    indices = [query.new_zeros((), dtype=torch.int32) for _ in range(4)]
    return ([query.new_zeros(())] if with_score else []) + indices


def trace_mod_into(mode: ProxyTorchDispatchMode, mod: Callable, example_args: Sequence[Any],
                   prefix: str) -> tuple[str, torch.fx.GraphModule]:
    """Trace ``mod`` inside the running make_fx session (same decompositions, same fake
    mode) and register it on the traced root under a fresh ``prefix_N`` name."""
    with index_with_tensors():
        graph = reenter_make_fx(mod)(*example_args)
    _, name = unique_graph_id(mode, prefix)
    mode.tracer.root.register_module(name, graph)
    return name, graph


def trace_mods_into(mode: ProxyTorchDispatchMode, query: Tensor, score_mod: Callable,
                    score_prefix: str, block_mask: tuple, score_mod_other_buffers: Sequence[Any],
                    mask_mod_other_buffers: Sequence[Any]) -> tuple[torch.fx.GraphModule, tuple]:
    """Trace a score_mod and the block mask's mask_mod into the running make_fx session;
    returns the score graph and the block mask tuple carrying the mask graph."""
    _, score_graph = trace_mod_into(mode, score_mod,
                                    mod_example_args(query) + list(score_mod_other_buffers),
                                    score_prefix)
    _, mask_graph = trace_mod_into(mode, OperatorBlockMask(*block_mask).mask_mod,
                                   mod_example_args(query, with_score=False) + list(mask_mod_other_buffers),
                                   MASK_MOD_PREFIX)
    return score_graph, replace_mask_mod(block_mask, mask_graph)


def check_mod_is_pure(mod: Callable, mod_name: str, example_args: Sequence[Any], pre_dispatch: bool) -> None:
    """Raise when ``mod`` writes to its arguments (the indices, score or captured buffers).

    A mod runs once per (b, h, q, kv) in any order, so an in-place update of a shared
    tensor has no meaning we could reproduce.
    """
    with index_with_tensors():
        mutates = _has_potential_branch_input_mutation(mod, list(example_args), pre_dispatch)
    if mutates:
        raise UnsupportedAliasMutationException(
            f"inductor_flex_attention: {mod_name} mutates one of its inputs or captured buffers "
            f"in place; {mod_name} must be a pure function of its arguments")


def replace_mask_mod(block_mask: tuple, mask_mod: Callable) -> tuple:
    """The plain operator block mask tuple with its mask_mod replaced."""
    return OperatorBlockMask(*block_mask).with_mask_mod(mask_mod)


def functionalize_mod(ctx, mod: Callable) -> Callable:
    """``ctx.functionalize(mod)``, with tensor indexing routed through ``aten.index``.

    Under functionalization the indices are functional wrappers, which plain indexing
    would read with ``.item()``; routing keeps ``bias[h]`` working under vmap as well.
    """
    functional = ctx.functionalize(mod)

    def run(*args):
        with index_with_tensors():
            return functional(*args)

    return run


def _is_functionalizing_pre_dispatch(ctx) -> bool:
    return bool(getattr(getattr(ctx, "mode", None), "pre_dispatch", False))


def unwrap_and_check_mods(ctx, query, score_mod, block_mask, score_mod_other_buffers,
                          mask_mod_other_buffers):
    """Functionalization's common first step for both operators: unwrap the block mask and
    the buffers, and refuse a score_mod / mask_mod that writes to its arguments."""
    block_mask = ctx.unwrap_tensors(tuple(block_mask))
    score_mod_other_buffers = ctx.unwrap_tensors(tuple(score_mod_other_buffers))
    mask_mod_other_buffers = ctx.unwrap_tensors(tuple(mask_mod_other_buffers))
    with ctx.redispatch_to_next():
        pre_dispatch = _is_functionalizing_pre_dispatch(ctx)
        check_mod_is_pure(score_mod, "score_mod",
                          mod_example_args(query) + list(score_mod_other_buffers), pre_dispatch)
        check_mod_is_pure(OperatorBlockMask(*block_mask).mask_mod, "mask_mod",
                          mod_example_args(query, with_score=False) + list(mask_mod_other_buffers),
                          pre_dispatch)
    return block_mask, score_mod_other_buffers, mask_mod_other_buffers


def joint_graph_buffer_grads(graph_module: torch.fx.GraphModule, num_buffers: int):
    """Which of the score_mod's ``num_buffers`` buffers a joint graph returns a gradient for
    (not ``None``), read off its output node; None when the output is not the score gradient
    followed by one entry per buffer."""
    output = next(n for n in graph_module.graph.nodes if n.op == "output")
    returned = output.args[0]
    if not isinstance(returned, (tuple, list)) or len(returned) != 1 + num_buffers:
        return None
    return [r is not None for r in returned[1:]]


# Keys a Python dispatch-mode handler excludes while it runs its op. Our kernels use
# vmap / func.vjp, which need the functorch keys, so a leaf kernel re-enables them.
_KEYS_MODE_HANDLERS_EXCLUDE = [
    getattr(torch._C.DispatchKey, name) for name in (
        "FuncTorchDynamicLayerBackMode", "FuncTorchDynamicLayerFrontMode", "FuncTorchBatched",
        "FuncTorchVmapMode", "BatchedNestedTensor", "Batched", "VmapMode", "FuncTorchGradWrapper",
        "Functionalize", "PythonTLSSnapshot", "Python", "PreDispatch", "ADInplaceOrView",
        "Conjugate", "Negative", "ZeroTensor")
    if hasattr(torch._C.DispatchKey, name)]


@contextlib.contextmanager
def as_leaf_kernel():
    """Run the body as plain eager code, whatever dispatch state the call arrived in.

    For the body of a custom op (the extern kernels, varlen_attn): a compiled program may
    call it under a dispatch mode (AOTAutograd checks custom ops for aliasing on their
    first run); the mode has already seen this call and must not see our internals, and
    its handler's excluded keys would disable vmap.
    """
    exclude = torch._C._dispatch_tls_local_exclude_set()
    for key in _KEYS_MODE_HANDLERS_EXCLUDE:
        exclude = exclude.remove(key)
    with torch.utils._python_dispatch._disable_current_modes(), \
            torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), exclude):
        yield
