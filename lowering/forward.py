"""CUDA lowering of the forward operator: one fused, block-sparse Triton kernel.

``lower_forward`` receives the operator's lowered arguments (docs/internals.md order):
Inductor IR nodes for the tensors, ``ir.Subgraph`` for score_mod and for the block mask's
mask_mod, Python (or sympy) scalars for the rest. It

1. decides whether the fused kernel applies, and returns ``None`` (the caller then uses the
   extern dense implementation) when it does not;
2. lowers score_mod and mask_mod to inlinable expressions (``subgraphs.py``);
3. settles every kernel constant in Python: tile configs (``configs.py``), which outputs
   are written, whether bounds checks are needed, how the scale is folded;
4. renders one choice per config from ``templates/forward.py.jinja`` +
   ``templates/common.py.jinja`` and lets ``autotune_select_algorithm`` pick;
5. returns ``(out, lse, max_scores)``; ``out`` is the template's own output, so pointwise
   epilogues (``.cos()``, a cast, ...) fuse into the kernel's store.
"""
import math
import operator
from pathlib import Path
from typing import Optional, Sequence

import sympy
import torch
from torch._inductor import config as inductor_config
from torch._inductor import ir
from torch._inductor.virtualized import V

from inductor_flex import _compat

from .configs import configs_summary, padded_head_dim, select_forward_configs
from .subgraphs import (
    MASK_MOD_PLACEHOLDERS,
    SCORE_MOD_PLACEHOLDERS,
    ModLoweringError,
    build_mod_buffer,
    is_identity_score_mod,
)

LOG2E = 1.4426950408889634
# Larger head dims exhaust registers and shared memory with these tiles.
MAX_HEAD_DIM = 256
# CUDA's limit on the y and z grid dimensions (batch, heads).
MAX_GRID_YZ = 65535
# Whether a block mask known at compile time to list its blocks in order (the one
# flex_attention builds when given none) walks them without reading indices. Off: on H100
# the index-free loop measured 10-15% slower (docs/kernels.md); the flag stays for retuning.
CONTIGUOUS_WHEN_KNOWN = False

_TEMPLATE_DIR = Path(__file__).resolve().parent.parent / "templates"
_template = None


def _template_source() -> str:
    from inductor_flex import templates

    directory = Path(templates.__file__).resolve().parent
    if not (directory / "forward.py.jinja").exists():
        directory = _TEMPLATE_DIR
    return ((directory / "forward.py.jinja").read_text()
            + (directory / "common.py.jinja").read_text())


def _forward_grid(batch, q_heads, q_len, head_dim, meta, *, cdiv):
    """One program per (BLOCK_M query rows, batch, query head)."""
    return (cdiv(q_len, meta["BLOCK_M"]), batch, q_heads)


def forward_template():
    """The forward TritonTemplate (created once; Inductor registers templates by name)."""
    global _template
    if _template is None:
        from torch._inductor.select_algorithm import SymbolicGridFn

        _template = _compat.make_triton_template(
            name="inductor_flex_fwd", grid=SymbolicGridFn(_forward_grid),
            source=_template_source())
    return _template


# ---------------------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------------------

def _known(expr) -> bool:
    return V.graph.sizevars.statically_known_true(expr)


def _static_int(value) -> Optional[int]:
    """``value`` as an int if it is one (or a constant sympy expression), else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, sympy.Expr) and value.is_number:
        return int(value)
    return None


def _static_float(value, known: dict) -> Optional[float]:
    """``value`` as a float, substituting the guarded sizes in ``known``; None if it
    still depends on a run-time size."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, sympy.Expr):
        value = V.graph.sizevars.simplify(value.xreplace(
            {k: v for k, v in known.items() if isinstance(k, sympy.Expr)}))
        if value.free_symbols:
            return None
        try:
            return float(value)
        except (TypeError, ValueError):
            return None
    return None


def _realize(node):
    """Realize ``node`` into a buffer with a fixed layout (the kernel reads its strides)."""
    from torch._inductor.select_algorithm import realize_inputs

    node = realize_inputs(node)
    try:
        node.freeze_layout()
    except (NotImplementedError, AttributeError):
        pass  # views and inputs already have a fixed layout
    return node


def _realize_buffer(buffer):
    """Realize a captured buffer in place, keeping the TensorBox the mod lowering expects."""
    if isinstance(buffer, ir.TensorBox):
        buffer.realize()
        try:
            buffer.freeze_layout()
        except (NotImplementedError, AttributeError):
            pass
    return buffer


def _output_strides(query, out_size):
    """Dense strides for ``out_size`` in the query's memory order (innermost dim of the
    query innermost; equal strides keep the later dim inner) -- the layout the operator's
    fake implementation gives, so no copy is needed at the graph boundary."""
    hint = V.graph.sizevars.optimization_hint
    strides = query.get_stride()
    fill_order = sorted(reversed(range(len(out_size))), key=lambda d: hint(strides[d]))
    out_strides = [None] * len(out_size)
    running = sympy.Integer(1)
    for d in fill_order:
        out_strides[d] = running
        running = running * out_size[d]
    return out_strides


def _output_used(index: int, default: bool) -> bool:
    """Whether the graph reads output ``index`` of the operator node being lowered; when
    the node cannot be seen, ``default`` (the kernel option)."""
    node = getattr(V.graph, "current_node", None)
    if node is None or not isinstance(node, torch.fx.Node) or not node.users:
        return default
    for user in node.users:
        if user.op != "call_function" or user.target is not operator.getitem:
            return True  # the tuple itself escapes: assume every output is read
        if user.args[1] == index:
            return True
    return False


class _NotAnIndexExpression(Exception):
    pass


class _IndexProbe:
    """An ops handler under which a loader evaluates to a sympy expression when its value
    is a constant or a pure index expression (``full``, ``zeros``, ``arange`` and views of
    them); any load from memory or arithmetic on values raises."""

    def constant(self, value, dtype):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _NotAnIndexExpression("constant")
        return sympy.sympify(value)

    def index_expr(self, expr, dtype):
        return expr

    def to_dtype(self, x, dtype, src_dtype=None, use_compute_types=True):
        return x

    def __getattr__(self, name):
        raise _NotAnIndexExpression(name)


def _index_expression(node):
    """(value, index symbols) if ``node``'s value at symbolic index is known at compile
    time (e.g. the block mask flex_attention builds when none is given), else (None, None)."""
    try:
        index = [sympy.Symbol(f"probe{d}", integer=True) for d in range(len(node.get_size()))]
        loader = node.make_loader()
        with V.set_ops_handler(_IndexProbe()):
            value = loader(index)
        value = getattr(value, "value", value)  # ops results come wrapped in OpsValue
        return (value, index) if isinstance(value, sympy.Expr) else (None, None)
    except Exception:  # any op the probe does not model: the value is data
        return None, None


def _known_empty(num_blocks) -> bool:
    """Whether a block-count tensor is the constant 0 (no block of that kind anywhere)."""
    value, _ = _index_expression(num_blocks)
    return value is not None and value == 0


def _known_contiguous(indices) -> bool:
    """Whether every row of a block-index tensor is 0, 1, 2, ... (blocks in order)."""
    value, index = _index_expression(indices)
    return value is not None and value == index[-1]


def _tma_compatible(node) -> bool:
    """TMA needs a unit inner stride and 16-byte aligned outer strides and offset."""
    itemsize = node.get_dtype().itemsize
    strides = node.get_stride()
    sizevars = V.graph.sizevars
    if not sizevars.statically_known_equals(strides[-1], 1):
        return False
    if not sizevars.statically_known_multiple_of(node.get_size()[-1] * itemsize, 16):
        return False
    for stride in strides[:-1]:
        if not sizevars.statically_known_multiple_of(stride * itemsize, 16):
            return False
    offset = node.get_layout().offset
    return sizevars.statically_known_multiple_of(offset * itemsize, 16)


def _flag(kernel_options, name: str, default: bool = False) -> bool:
    value = kernel_options.get(name, default)
    return default if value is None else bool(value)


# ---------------------------------------------------------------------------------------
# Autotuning inputs: the block mask must be valid data, not random bytes
# ---------------------------------------------------------------------------------------

def _hints(node):
    return V.graph.sizevars.optimization_hints(node.get_size())


def _block_counts_for_autotune(indices_node, partial: bool, has_full_blocks: bool):
    """Block counts for timing choices: one partial block per row (the diagonal or edge
    block of a typical mask) and every other block full -- or every block partial when
    the mask has no full blocks -- so both inner loops weigh as they usually do."""
    def generate(node):
        columns = _hints(indices_node)[-1]
        if not has_full_blocks:
            count = columns
        elif partial:
            count = min(1, columns)
        else:
            count = max(0, columns - 1)
        return torch.full(_hints(node), count, dtype=node.get_dtype(), device=node.get_device())
    return generate


def _block_indices_for_autotune(node):
    size = _hints(node)
    columns = torch.arange(size[-1], dtype=node.get_dtype(), device=node.get_device())
    return columns.expand(size).contiguous()


# ---------------------------------------------------------------------------------------
# The lowering
# ---------------------------------------------------------------------------------------

def lower_forward(query, key, value, score_mod, block_mask, scale, kernel_options,
                  score_mod_other_buffers=(), mask_mod_other_buffers=()):
    """Lower the forward operator to the fused Triton kernel, or return None to fall back
    to the extern dense implementation (reasons in the comments below)."""
    kernel_options = dict(kernel_options or {})
    (q_len_arg, kv_len_arg, kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices,
     _q_num_blocks, _q_indices, _full_q_num_blocks, _full_q_indices,
     sparse_q_block, sparse_kv_block, mask_mod) = block_mask

    # --- what the kernel covers -----------------------------------------------------------
    dtype = query.get_dtype()
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return None  # float64 and friends: tl.dot has no such path; the exact path is right
    if key.get_dtype() != dtype or value.get_dtype() != dtype:
        return None  # mixed dtypes: the api rejects them; nothing to fuse
    if not isinstance(score_mod, ir.Subgraph) or not isinstance(mask_mod, ir.Subgraph):
        return None  # mods that are not graphs cannot be inlined
    buffers = list(score_mod_other_buffers) + list(mask_mod_other_buffers)
    if any(not isinstance(b, ir.IRNode) for b in buffers):
        return None  # a captured symbolic scalar: no kernel argument carries it yet
    sparse_q_block = _static_int(sparse_q_block)
    sparse_kv_block = _static_int(sparse_kv_block)
    if sparse_q_block is None or sparse_kv_block is None:
        return None  # symbolic block sizes: the tile must divide them at compile time

    batch, q_heads, q_len, qk_head_dim_expr = query.get_size()
    kv_batch, kv_heads, kv_len, _ = key.get_size()
    v_head_dim_expr = value.get_size()[-1]
    # Head dims shape the tiles, so they are compile-time constants (guarded).
    qk_head_dim = V.graph.sizevars.guard_int(qk_head_dim_expr)
    v_head_dim = V.graph.sizevars.guard_int(v_head_dim_expr)
    # The default scale is 1/sqrt(E): symbolic when E is, constant once E is guarded.
    scale = _static_float(scale, {qk_head_dim_expr: qk_head_dim, v_head_dim_expr: v_head_dim})
    if scale is None or not math.isfinite(scale):
        return None  # a scale that varies at run time: it is baked into the kernel
    if max(qk_head_dim, v_head_dim) > MAX_HEAD_DIM or min(qk_head_dim, v_head_dim) < 1:
        return None  # tiles would not fit in registers / shared memory
    if _known(sympy.Eq(q_len, 0)) or _known(sympy.Eq(kv_len, 0)):
        return None  # nothing to compute; the dense path writes the empty results
    if _known(sympy.Gt(batch, MAX_GRID_YZ)) or _known(sympy.Gt(q_heads, MAX_GRID_YZ)):
        return None  # the launch grid puts batch and heads on the y / z axes

    # What the block mask's contents tell at compile time: with no mask given, flex_attention
    # builds one in the graph (no partial blocks, every block full and in order).
    has_full_blocks = full_kv_num_blocks is not None and full_kv_indices is not None
    has_partial_blocks = not _known_empty(kv_num_blocks)
    if has_full_blocks and _known_empty(full_kv_num_blocks):
        has_full_blocks = False
    known_contiguous = ((not has_partial_blocks or _known_contiguous(kv_indices))
                        and (not has_full_blocks or _known_contiguous(full_kv_indices)))

    capability = torch.cuda.get_device_capability(query.get_device())
    configs = select_forward_configs(capability, dtype, qk_head_dim, v_head_dim,
                                     sparse_q_block, sparse_kv_block, kernel_options,
                                     max_autotune=bool(inductor_config.max_autotune),
                                     mask_free=not has_partial_blocks)
    if not configs:
        return None  # sparse blocks too small (or not a power of 2) for a tl.dot tile

    # --- score_mod / mask_mod -> inlinable expressions ---------------------------------------
    device = query.get_device()
    score_mod_other_buffers = [_realize_buffer(b) for b in score_mod_other_buffers]
    mask_mod_other_buffers = [_realize_buffer(b) for b in mask_mod_other_buffers]
    has_score_mod = not is_identity_score_mod(score_mod)
    approx_tanh = dtype in (torch.float16, torch.bfloat16) and _flag(kernel_options, "APPROX_TANH", True)
    try:
        score_buffer = build_mod_buffer(
            score_mod, SCORE_MOD_PLACEHOLDERS, (dtype,) + (torch.int32,) * 4,
            score_mod_other_buffers, device, approx_tanh=approx_tanh)
        mask_buffer = build_mod_buffer(
            mask_mod, MASK_MOD_PLACEHOLDERS, (torch.int32,) * 4, mask_mod_other_buffers, device)
    except ModLoweringError:
        return None  # the mod needs more than one pointwise expression

    # --- inputs and outputs -------------------------------------------------------------------
    query, key, value = (_realize(x) for x in (query, key, value))
    mask_inputs = [_realize(kv_num_blocks), _realize(kv_indices)]
    if has_full_blocks:
        mask_inputs += [_realize(full_kv_num_blocks), _realize(full_kv_indices)]

    from torch._inductor.lowering import empty_strided

    out_size = [batch, q_heads, q_len, v_head_dim]
    layout = ir.FixedLayout(device, dtype, out_size, stride=_output_strides(query, out_size))
    lse = empty_strided([batch, q_heads, q_len], None, dtype=torch.float32, device=device)
    max_scores = empty_strided([batch, q_heads, q_len], None, dtype=torch.float32, device=device)
    input_nodes = [query, key, value, lse, max_scores] + mask_inputs

    # --- constants decided here, not in the kernel ---------------------------------------------
    prescale = _flag(kernel_options, "PRESCALE_QK")
    # With no score_mod and a positive scale, the scale folds into the base-2 conversion
    # (row max commutes with a positive factor), leaving one FMA per score.
    fold_scale = not has_score_mod and scale > 0
    if fold_scale:
        logit_scale, qk_prescale = (1.0, scale * LOG2E) if prescale else (scale * LOG2E, 1.0)
    else:
        logit_scale, qk_prescale = LOG2E, scale
    # TMA: a config's preference unless the user says; only where the GPU and layouts allow.
    tma_requested = kernel_options.get("USE_TMA")
    tma_possible = (capability >= (9, 0) and _compat.triton_has_tensor_descriptors()
                    and all(_tma_compatible(x) for x in (query, key, value)))
    divisible = (_known(sympy.Eq(sympy.Mod(kv_len, sparse_kv_block), 0)))
    constants = dict(
        SPARSE_Q_BLOCK_SIZE=sparse_q_block,
        SPARSE_KV_BLOCK_SIZE=sparse_kv_block,
        QK_HEAD_DIM=qk_head_dim,
        QK_HEAD_DIM_ROUNDED=padded_head_dim(qk_head_dim),
        V_HEAD_DIM=v_head_dim,
        V_HEAD_DIM_ROUNDED=padded_head_dim(v_head_dim),
        HAS_PARTIAL_BLOCKS=has_partial_blocks,
        HAS_FULL_BLOCKS=has_full_blocks,
        HAS_SCORE_MOD=has_score_mod or not fold_scale,
        SM_SCALE=scale,
        LOGIT_SCALE=logit_scale,
        PRESCALE_QK=prescale,
        QK_PRESCALE=qk_prescale,
        ROWS_GUARANTEED_SAFE=_flag(kernel_options, "ROWS_GUARANTEED_SAFE"),
        BLOCKS_ARE_CONTIGUOUS=_flag(kernel_options, "BLOCKS_ARE_CONTIGUOUS",
                                    known_contiguous and CONTIGUOUS_WHEN_KNOWN),
        WARP_SPECIALIZE=_flag(kernel_options, "WARP_SPECIALIZE"),
        OUTPUT_LOGSUMEXP=_output_used(1, _flag(kernel_options, "OUTPUT_LOGSUMEXP", True)),
        OUTPUT_MAX=_output_used(2, _flag(kernel_options, "OUTPUT_MAX", True)),
        FLOAT32_PRECISION="'ieee'" if _compat.float32_matmul_is_ieee() else "'tf32'",
    )

    # --- one choice per config -----------------------------------------------------------------
    template = forward_template()
    choices = []
    errors = []
    seen = set()
    for config in configs:
        use_tma = (config.tma if tma_requested is None else bool(tma_requested)) and tma_possible
        launch = (config.block_m, config.block_n, config.num_warps, config.num_stages, use_tma)
        if launch in seen:
            continue  # the same kernel as an earlier choice once TMA is resolved
        seen.add(launch)
        options = dict(constants, BLOCK_M=config.block_m, BLOCK_N=config.block_n, USE_TMA=use_tma)
        # The query side only needs BLOCK_M to divide Q_LEN: partial query tiles never read
        # the block mask beyond its last row.
        options["IS_DIVISIBLE"] = divisible and _known(sympy.Eq(sympy.Mod(q_len, config.block_m), 0))
        error = template.maybe_append_choice(
            choices,
            input_nodes=input_nodes,
            layout=layout,
            subgraphs=[score_buffer, mask_buffer],
            mutated_inputs=[lse, max_scores],
            call_sizes=query.get_size(),
            num_stages=config.num_stages,
            num_warps=config.num_warps,
            **options,
        )
        if error is not None:
            errors.append(error)
    if not choices:
        raise RuntimeError(f"inductor_flex: no forward kernel could be generated for configs "
                           f"{configs_summary(configs)}: {errors[0] if errors else 'unknown'}")

    autotune_inputs = input_nodes + [b for b in score_mod_other_buffers + mask_mod_other_buffers
                                     if isinstance(b, ir.IRNode)]
    input_gen_fns = {
        5: _block_counts_for_autotune(kv_indices, True, has_full_blocks),
        6: _block_indices_for_autotune,
    }
    if has_full_blocks:
        input_gen_fns[7] = _block_counts_for_autotune(full_kv_indices, False, has_full_blocks)
        input_gen_fns[8] = _block_indices_for_autotune
    result = autotune_select_algorithm_compat("inductor_flex_attention", choices, autotune_inputs,
                                              layout, input_gen_fns)
    out = _compat.autotune_result_node(result)
    _record_subgraph_symbols(out, score_mod_other_buffers + mask_mod_other_buffers,
                             [score_buffer, mask_buffer])
    return out, lse, max_scores


def autotune_select_algorithm_compat(name, choices, inputs, layout, input_gen_fns):
    from torch._inductor.select_algorithm import autotune_select_algorithm

    return autotune_select_algorithm(name, choices, inputs, layout, input_gen_fns=input_gen_fns)


def _record_subgraph_symbols(out, inputs: Sequence, outputs: Sequence) -> None:
    """Tell the template buffer which IR the inlined mods read, so the sizes those
    buffers depend on are passed to the kernel under dynamic shapes."""
    node = getattr(getattr(out, "data", None), "data", None)
    if node is not None and hasattr(node, "subgraph_inps"):
        node.subgraph_inps = list(inputs)
        node.subgraph_outs = list(outputs)
