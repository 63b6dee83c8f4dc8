"""Every difference between the torch versions we support (>= 2.11) lives here."""
import contextlib

import torch

# --- Dynamo capture rule (inductor_flex/dynamo.py) -------------------------------------
# Imported lazily: torch._dynamo is heavy and most importers of _compat do not need it.


def dynamo_hop_variables_module():
    """``torch._dynamo.variables.higher_order_ops`` (home of speculate_subgraph,
    discard_graph_changes and TorchHigherOrderOperatorVariable in 2.11 and 2.13)."""
    from torch._dynamo.variables import higher_order_ops

    return higher_order_ops


def dynamo_hop_variable_registry() -> dict:
    """The dict Dynamo consults (by operator name) to pick a HOP's variable class."""
    return dynamo_hop_variables_module()._hop_name_to_variable_class


def hop_variable_splits_call_function() -> bool:
    """True where TorchHigherOrderOperatorVariable.call_function does the torch-function
    check and delegates to ``_call_function`` (the hook subclasses then override)."""
    base = dynamo_hop_variables_module().TorchHigherOrderOperatorVariable
    return "_call_function" in base.__dict__


def dynamo_unsupported(*, gb_type: str, context: str, explanation: str, hints: list):
    """Raise Dynamo's ``Unsupported`` (a graph break, or an error under fullgraph)."""
    import inspect

    from torch._dynamo import exc

    unimplemented = exc.unimplemented
    if "gb_type" not in inspect.signature(unimplemented).parameters:
        unimplemented = exc.unimplemented_v2  # older name of the structured form
    unimplemented(gb_type=gb_type, context=context, explanation=explanation, hints=hints)


def dynamo_build_variable(tx, value):
    """A source-less VariableTracker for a Python value."""
    from torch._dynamo.variables.base import VariableTracker

    if hasattr(VariableTracker, "build"):
        return VariableTracker.build(tx, value)
    from torch._dynamo.variables.builder import SourcelessBuilder

    return SourcelessBuilder.create(tx, value)


def dynamo_discard_graph_changes(tx):
    """Context in which graph calls made through ``tx`` are thrown away afterwards (only
    their example values survive): Dynamo's own helper where it has one, else the
    throw-away subtracer that helper is made of."""
    helper = getattr(dynamo_hop_variables_module(), "discard_graph_changes", None)
    if helper is not None:
        return helper(tx)
    return tx.output.subtracer("subgraph_wrapper", None)


# --- GPU forward template (lowering/forward.py) -------------------------------------------
# Used only when lowering for CUDA; imported lazily so CPU-only installs never touch them.


def make_triton_template(name: str, grid, source: str):
    """A TritonTemplate whose inputs get frozen layouts as soon as the kernel reads their
    strides. 2.13 spells that ``always_freeze_layout=True``; 2.11 has no such argument
    (the lowering freezes the layouts itself before rendering)."""
    import inspect

    from torch._inductor.select_algorithm import TritonTemplate

    extra = {}
    if "always_freeze_layout" in inspect.signature(TritonTemplate.__init__).parameters:
        extra["always_freeze_layout"] = True
    return TritonTemplate(name=name, grid=grid, source=source, **extra)


def autotune_result_node(result):
    """``autotune_select_algorithm`` returns the chosen node in 2.11 and
    ``(node, extra)`` in 2.13."""
    return result[0] if isinstance(result, tuple) else result


def buffer_may_be_unaligned(name: str) -> bool:
    """Whether Inductor cannot promise that buffer ``name`` starts 16-byte aligned (a graph
    input whose example was unaligned, or memory it does not own). torch 2.13 answers with
    ``triton_utils.is_unaligned_buffer_name``; 2.11 has only the TensorArg form, so the same
    facts are read here, taking memory it does not own as unaligned."""
    try:
        from torch._inductor.codegen.triton_utils import is_unaligned_buffer_name
    except ImportError:
        from torch._inductor import ir
        from torch._inductor.virtualized import V

        if name in V.graph.unaligned_buffers:
            return True
        if name in V.graph.graph_inputs or name in V.graph.constants:
            return False
        buffer = V.graph.try_get_buffer(name)
        return buffer is not None and isinstance(buffer.get_layout(), ir.NonOwningLayout)
    return is_unaligned_buffer_name(name)


def float32_matmul_is_ieee() -> bool:
    """Whether float32 matmuls must be exact float32 (no TF32), as cuBLAS would be."""
    precision = getattr(torch.backends.cuda.matmul, "fp32_precision", None)
    if precision in ("ieee", "tf32"):
        return precision == "ieee"
    return torch.get_float32_matmul_precision() == "highest"


def triton_has_tensor_descriptors() -> bool:
    """Whether this Triton builds TMA descriptors in-kernel (``tl.make_tensor_descriptor``)."""
    try:
        import triton.language as tl
    except ImportError:
        return False
    return hasattr(tl, "make_tensor_descriptor")


def triton_has_host_tensor_descriptors() -> bool:
    """Whether this Triton takes TMA descriptors built on the host (``TensorDescriptor``
    kernel arguments) and this GPU has the TMA."""
    try:
        from torch.utils._triton import has_triton_tensor_descriptor_host_tma
    except ImportError:
        return False
    return has_triton_tensor_descriptor_host_tma()


def current_accelerator():
    """The current accelerator device (CUDA, ...) or None (``torch.accelerator`` in 2.11+)."""
    accelerator = getattr(torch, "accelerator", None)
    if accelerator is None or not accelerator.is_available():
        return None
    return accelerator.current_accelerator()


# --- The compiled block-mask builder (inductor_flex/block_mask.py) ------------------------


def compiled_calls_run_eagerly() -> bool:
    """True where a ``torch.compile``d function would silently run as plain Python: Dynamo
    switched off (``torch._dynamo.config.disable``) or an eager stance
    (``torch.compiler.set_stance``). Reads private state, hence here; unknown: False."""
    import torch._dynamo

    if torch._dynamo.config.disable:
        return True
    stance = getattr(getattr(torch._dynamo.eval_frame, "_stance", None), "stance", "default")
    return stance in ("force_eager", "eager_on_recompile")


def dynamo_raise_on_recompile_limit():
    """A context in which a compiled function that reaches Dynamo's recompile limit raises
    (instead of running its frame eagerly from then on); a no-op context where that
    cannot be asked for (``suppress_errors`` forbids it)."""
    import contextlib

    import torch._dynamo

    config = torch._dynamo.config
    if config.suppress_errors or not hasattr(config, "fail_on_recompile_limit_hit"):
        return contextlib.nullcontext()
    return _config_set(config, "fail_on_recompile_limit_hit", True)


@contextlib.contextmanager
def _config_set(config, name: str, value):
    # A plain set and restore: config.patch builds a patcher object per call (~50 us), and
    # create_block_mask enters this once per mask.
    saved = getattr(config, name)
    setattr(config, name, value)
    try:
        yield
    finally:
        setattr(config, name, saved)


def is_recompile_limit_error(error: BaseException) -> bool:
    from torch._dynamo import exc

    limit_error = getattr(exc, "FailOnRecompileLimitHit", None)
    return limit_error is not None and isinstance(error, limit_error)


# --- Block masks made by PyTorch's own create_block_mask (inductor_flex/api.py) ----------
# flex_attention accepts them by duck typing; their as_tuple() layout is the one thing
# that differs between versions.


def block_mask_tuple_in_2_13_layout(block_mask_tuple: tuple) -> tuple:
    """A flattened ``BlockMask.as_tuple()`` of PyTorch's in 2.13's 17-item layout (lengths,
    eight block lists, four dQ write-order entries, block sizes, mask_mod). In 2.11 it has
    13 items, without the write-order entries (then None); told apart by length."""
    items = tuple(block_mask_tuple)
    if len(items) == 17:
        return items
    if len(items) == 13:
        return items[:10] + (None, None, None, None) + items[10:]
    raise ValueError(f"a block mask's as_tuple() has 13 or 17 items, got {len(items)}")


# --- Activation checkpointing (inductor_flex/ops/forward.py, backward.py) -----------------


def redirect_to_checkpoint_modes(hop) -> None:
    """Let the dispatch modes of torch.utils.checkpoint see ``hop`` as one op, as PyTorch
    does for its own flex_attention. Without it, checkpointing a block that calls us under
    torch.compile (the ``tag_activation_checkpoint`` body is traced under
    ``_CachingTorchDispatchMode``), or selective checkpointing in eager, fails with "no rule
    registered for HigherOrderOperator". Both modes and the helper exist in 2.11 and 2.13."""
    from torch._higher_order_ops.utils import redirect_to_mode
    from torch.utils.checkpoint import _CachedTorchDispatchMode, _CachingTorchDispatchMode

    redirect_to_mode(hop, _CachingTorchDispatchMode)
    redirect_to_mode(hop, _CachedTorchDispatchMode)


def register_inductor_decomposition(op, function) -> None:
    """Add ``op -> function`` to the decompositions Inductor applies while AOTAutograd
    traces (``select_decomp_table``), including the cached copy it may already have made."""
    from torch._inductor import decomposition

    decomposition.decompositions[op] = function
    cached = getattr(decomposition, "fast_random_decomps", None)
    if cached is not None:
        cached()[op] = function


# --- CPU features (inductor_flex/ops/dense.py) ------------------------------------------

def cpu_has_bfloat16_matmul_units() -> bool:
    """True where the CPU multiplies bfloat16 natively (AVX512-BF16 or AMX), so oneDNN's
    bfloat16 matmul beats a float32 one; ``torch.cpu`` probes by these names in 2.11 and 2.13."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in probes)


def host_reading_op_tags() -> tuple:
    """Tags for a custom op that reads device tensors on the host (the dense extern
    kernels read the block lists): CUDA-graph trees then run it outside a graph instead of
    failing to capture it. ``cudagraph_unsafe`` may be missing from older builds."""
    tag = getattr(torch.Tag, "cudagraph_unsafe", None)
    return (tag,) if tag is not None else ()


def inductor_with_decompositions(extra: dict):
    """A ``torch.compile`` backend: Inductor with ``extra`` (op -> function) added to the
    decompositions AOTAutograd applies, for this compile only (``compile_fx``'s
    ``decompositions`` argument, in 2.11 and 2.13). AOTAutograd's cache is off for it: its
    key does not see the decompositions, so it would hand this compile another compile's
    kernel of the same graph, or another compile this one's."""
    from torch._functorch import config as functorch_config
    from torch._inductor.compile_fx import compile_fx
    from torch._inductor.decomposition import select_decomp_table

    def backend(graph_module, example_inputs):
        with functorch_config.patch(enable_autograd_cache=False):
            return compile_fx(graph_module, example_inputs,
                              decompositions={**select_decomp_table(), **extra})

    return backend
