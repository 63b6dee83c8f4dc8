"""Helpers shared by the forward and backward lowerings (``forward.py``, ``backward.py``).

Everything here runs while Inductor lowers a graph (``V.graph`` is the graph being lowered):
reading sizes and scalars known at compile time, realizing inputs with fixed layouts,
recognising block-mask tensors whose contents are known (the one flex_attention builds when
given none), and making valid block-mask data for autotuning.
"""
import math
import operator
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import sympy
import torch
from torch._inductor import ir
from torch._inductor.virtualized import V

from .dispatch import Declined


# ---------------------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------------------

def known_true(expr) -> bool:
    return V.graph.sizevars.statically_known_true(expr)


def static_int(value) -> Optional[int]:
    """``value`` as an int if it is one (or a constant sympy expression), else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, sympy.Expr) and value.is_number:
        return int(value)
    return None


def static_float(value, known: dict) -> Optional[float]:
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
            pass
        # Some versions keep functions of constants (sqrt of a guarded head dim) unevaluated
        # in sympy; Python evaluates their printed form.
        from torch.utils._sympy.printers import PythonPrinter

        try:
            return float(eval(PythonPrinter().doprint(value), {"math": math}))
        except Exception:  # anything the printer or eval rejects: not a constant we can read
            return None
    return None


def realize_fixed(node):
    """Realize ``node`` into a buffer with a fixed layout (the kernel reads its strides)."""
    from torch._inductor.select_algorithm import realize_inputs

    node = realize_inputs(node)
    try:
        node.freeze_layout()
    except (NotImplementedError, AttributeError):
        pass  # views and inputs already have a fixed layout
    return node


def realize_captured(buffer):
    """Realize a captured buffer in place, keeping the TensorBox the mod lowering expects."""
    if isinstance(buffer, ir.TensorBox):
        buffer.realize()
        try:
            buffer.freeze_layout()
        except (NotImplementedError, AttributeError):
            pass
    return buffer


def dense_strides_like(query, out_size):
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


def output_used(index: int, default: bool) -> bool:
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


def known_empty(num_blocks) -> bool:
    """Whether a block-count tensor is the constant 0 (no block of that kind anywhere)."""
    value, _ = _index_expression(num_blocks)
    return value is not None and value == 0


def base_pointer_aligned(node) -> bool:
    """Whether the buffer under ``node`` starts on a 16-byte boundary. A graph input's
    storage offset is not in its layout (it is inside the data pointer): Inductor records
    the inputs whose example was unaligned, and copies an unaligned input at run time when
    the example was aligned, so the record is the fact to go by."""
    from inductor_flex import _compat

    return not _compat.buffer_may_be_unaligned(node.get_name())


def tma_compatible(node) -> bool:
    """TMA needs a 16-byte aligned base pointer, a unit inner stride and 16-byte aligned
    outer strides and offset."""
    if not base_pointer_aligned(node):
        return False
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


def tma_possible(capability, tensors) -> bool:
    """Whether tiles of ``tensors`` may come through the TMA: a GPU generation whose config
    table allows it (Hopper and newer parts in ``configs.GENERATIONS``; not a GPU missing
    from the tables), a Triton with on-device tensor descriptors, and layouts the TMA
    accepts."""
    from inductor_flex import _compat

    from .configs import tma_loads_allowed

    return (tma_loads_allowed(capability) and _compat.triton_has_tensor_descriptors()
            and all(tma_compatible(x) for x in tensors))


# ---------------------------------------------------------------------------------------
# Autotuning inputs: the block mask must be valid data, not random bytes
# ---------------------------------------------------------------------------------------

def size_hints(node):
    return V.graph.sizevars.optimization_hints(node.get_size())


def block_counts_for_autotune(indices_node, partial: bool, has_full_blocks: bool):
    """Block counts for timing choices: one partial block per row (the diagonal or edge
    block of a typical mask) and every other block full -- or every block partial when
    the mask has no full blocks -- so both inner loops weigh as they usually do."""
    def generate(node):
        columns = size_hints(indices_node)[-1]
        if not has_full_blocks:
            count = columns
        elif partial:
            count = min(1, columns)
        else:
            count = max(0, columns - 1)
        return torch.full(size_hints(node), count, dtype=node.get_dtype(), device=node.get_device())
    return generate


def block_indices_for_autotune(node):
    size = size_hints(node)
    columns = torch.arange(size[-1], dtype=node.get_dtype(), device=node.get_device())
    return columns.expand(size).contiguous()


def record_subgraph_symbols(out, inputs: Sequence, outputs: Sequence) -> None:
    """Tell the template buffer which IR the inlined mods read, so the sizes those
    buffers depend on are passed to the kernel under dynamic shapes."""
    node = getattr(getattr(out, "data", None), "data", None)
    if node is not None and hasattr(node, "subgraph_inps"):
        node.subgraph_inps = list(inputs)
        node.subgraph_outs = list(outputs)


_TEMPLATE_DIR = Path(__file__).resolve().parent.parent / "templates"


def template_source(main_file: str) -> str:
    """A template's Jinja source: ``common.py.jinja`` (the shared macros and device
    functions) followed by ``main_file`` (its kernel). The shared file comes first so its
    macros are defined where the kernel uses them (Inductor's Jinja environment has no
    loader, hence no ``{% import %}``); it renders no text of its own, and the kernel
    template places the shared device functions after the kernel. Read from the installed
    ``inductor_flex.templates`` package, or from the source tree when running from a
    checkout."""
    from inductor_flex import templates

    directory = Path(templates.__file__).resolve().parent
    if not (directory / main_file).exists():
        directory = _TEMPLATE_DIR
    return (directory / "common.py.jinja").read_text() + (directory / main_file).read_text()


LOG2E = 1.4426950408889634  # converts natural-log units to base 2

# Larger head dims exhaust registers and shared memory with our tiles.
MAX_HEAD_DIM = 256
# CUDA's limit on the y and z grid dimensions (batch, heads).
MAX_GRID_YZ = 65535


@dataclass(frozen=True)
class AttentionProblem:
    """What a fused kernel needs to know at compile time about one attention call."""
    dtype: torch.dtype
    batch: object          # sizes: ints or sympy expressions
    q_heads: object
    q_len: object
    kv_batch: object
    kv_heads: object
    kv_len: object
    qk_head_dim: int       # head dims shape the tiles: guarded to constants
    v_head_dim: int
    scale: float
    sparse_q_block: int
    sparse_kv_block: int
    capability: tuple


def attention_problem(query, key, value, mods: Sequence, sparse_q_block, sparse_kv_block,
                      scale, buffers: Sequence) -> AttentionProblem:
    """The compile-time description of a call the fused kernels cover; ``Declined`` (with
    the reason) when they do not."""
    dtype = query.get_dtype()
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise Declined(f"dtype {dtype}: tl.dot has no such path; the exact path is right")
    if key.get_dtype() != dtype or value.get_dtype() != dtype:
        raise Declined("query, key and value dtypes differ")
    if not all(isinstance(mod, ir.Subgraph) for mod in mods):
        raise Declined("a mod that is not a graph cannot be inlined")
    if any(not isinstance(b, (ir.IRNode, sympy.Expr, int)) for b in buffers):
        raise Declined("a mod captures something that is neither a tensor nor an integer")
    sparse_q_block = static_int(sparse_q_block)
    sparse_kv_block = static_int(sparse_kv_block)
    if sparse_q_block is None or sparse_kv_block is None:
        raise Declined("symbolic block mask BLOCK_SIZE: the tile must divide it at compile time")

    batch, q_heads, q_len, qk_head_dim_expr = query.get_size()
    kv_batch, kv_heads, kv_len, _ = key.get_size()
    v_head_dim_expr = value.get_size()[-1]
    qk_head_dim = V.graph.sizevars.guard_int(qk_head_dim_expr)
    v_head_dim = V.graph.sizevars.guard_int(v_head_dim_expr)
    # The default scale is 1/sqrt(E): symbolic when E is, constant once E is guarded.
    scale = static_float(scale, {qk_head_dim_expr: qk_head_dim, v_head_dim_expr: v_head_dim})
    if scale is None or not math.isfinite(scale):
        raise Declined("a scale that varies at run time (it is baked into the kernel) or is not finite")
    if max(qk_head_dim, v_head_dim) > MAX_HEAD_DIM or min(qk_head_dim, v_head_dim) < 1:
        raise Declined(f"head dims {qk_head_dim}/{v_head_dim} outside 1..{MAX_HEAD_DIM}: the tiles would not fit")
    if known_true(sympy.Eq(q_len, 0)) or known_true(sympy.Eq(kv_len, 0)):
        raise Declined("an empty sequence: nothing to compute; the dense path writes the empty results")
    if any(known_true(sympy.Gt(n, MAX_GRID_YZ)) for n in (batch, q_heads)):
        raise Declined(f"batch or heads above {MAX_GRID_YZ}: the launch grid puts them on the y / z axes")
    capability = torch.cuda.get_device_capability(query.get_device())
    return AttentionProblem(dtype, batch, q_heads, q_len, kv_batch, kv_heads, kv_len,
                            qk_head_dim, v_head_dim, scale, sparse_q_block, sparse_kv_block,
                            capability)


def listed_block_kinds(kv_num_blocks, full_kv_num_blocks, full_kv_indices) -> tuple:
    """(has_partial_blocks, has_full_blocks): which kinds of block the mask may list, as far
    as the graph tells at compile time (a count tensor that is the constant 0 lists none)."""
    has_full_blocks = (full_kv_num_blocks is not None and full_kv_indices is not None
                       and not known_empty(full_kv_num_blocks))
    return not known_empty(kv_num_blocks), has_full_blocks


def shape_constants(problem: AttentionProblem) -> dict:
    """The constexprs both kernels take from the block mask's block sizes and the head
    dims (padded to the tile widths the kernels load)."""
    from .configs import padded_head_dim

    return dict(
        SPARSE_Q_BLOCK_SIZE=problem.sparse_q_block,
        SPARSE_KV_BLOCK_SIZE=problem.sparse_kv_block,
        QK_HEAD_DIM=problem.qk_head_dim,
        QK_HEAD_DIM_ROUNDED=padded_head_dim(problem.qk_head_dim),
        V_HEAD_DIM=problem.v_head_dim,
        V_HEAD_DIM_ROUNDED=padded_head_dim(problem.v_head_dim),
    )


def block_mask_input_generators(first_position: int, block_lists: Sequence,
                                has_full_blocks: bool) -> dict:
    """Autotuning input generators for the block-mask tensors of a kernel's argument list:
    ``block_lists`` holds one ``(indices node, partial)`` per (counts, indices) pair, the
    pairs standing in that order from ``first_position`` on."""
    generators = {}
    for pair, (indices, partial) in enumerate(block_lists):
        position = first_position + 2 * pair
        generators[position] = block_counts_for_autotune(indices, partial, has_full_blocks)
        generators[position + 1] = block_indices_for_autotune
    return generators


def choose_kernel(template, name: str, launches: Sequence, *, input_nodes, layout, subgraphs,
                  mutated_inputs, call_sizes, input_generators: dict, describe: str,
                  extra_choices: Optional[Callable] = None):
    """Render one choice of ``template`` per launch ``(num_warps, num_stages, options)`` and
    let ``autotune_select_algorithm`` pick (a single choice is taken without timing).
    ``extra_choices(input_nodes, layout)``, when given, adds choices of other kernels timed
    on the same arguments (the vendor kernels, ``vendor.py``).

    Autotuning runs the kernel on made-up inputs: ``input_generators`` makes the block-mask
    tensors valid data. The kernel's arguments are the named inputs, then the buffers the
    inlined mods read (and add into), in the order the rendered kernel first uses them,
    which the first choice records. Returns the chosen kernel's output node."""
    from inductor_flex import _compat

    choices, errors = [], []
    for num_warps, num_stages, options in launches:
        error = template.maybe_append_choice(
            choices, input_nodes=input_nodes, layout=layout, subgraphs=subgraphs,
            mutated_inputs=mutated_inputs, call_sizes=call_sizes, num_stages=num_stages,
            num_warps=num_warps, **options)
        if error is not None:
            errors.append(error)
    if not choices:
        raise RuntimeError(f"inductor_flex: no {name} kernel could be generated for configs "
                           f"{describe}: {errors[0] if errors else 'unknown'}")
    from torch._inductor.select_algorithm import autotune_select_algorithm

    timed_inputs = list(choices[0].input_nodes)
    if extra_choices is not None:
        choices = choices + list(extra_choices(timed_inputs, layout))
    result = autotune_select_algorithm(f"inductor_flex_{name}", choices, timed_inputs, layout,
                                       input_gen_fns=input_generators)
    return _compat.autotune_result_node(result)


_templates: dict = {}


def cached_template(name: str, grid, main_file: str, kernel_type=None):
    """The TritonTemplate ``name`` (created once: Inductor registers templates by name),
    rendered by ``kernel_type`` (a ``template_kernel.FlexTemplateKernel`` subclass; that
    class itself by default)."""
    if name not in _templates:
        from torch._inductor.select_algorithm import SymbolicGridFn

        from inductor_flex import _compat

        template = _compat.make_triton_template(
            name=name, grid=SymbolicGridFn(grid), source=template_source(main_file))
        from .template_kernel import FlexTemplateKernel

        template.kernel_type = kernel_type or FlexTemplateKernel
        _templates[name] = template
    return _templates[name]


def folds_scale(has_score_mod: bool, scale: float) -> bool:
    """Whether the softmax scale can fold into the base-2 conversion (one FMA per score):
    only without a score_mod, and only for a positive scale: masked scores are -inf before
    the multiply, and -inf times a scale <= 0 is +inf or NaN."""
    return not has_score_mod and scale > 0


# ---------------------------------------------------------------------------------------
# Steps both lowerings take the same way
# ---------------------------------------------------------------------------------------

def approximate_tanh(dtype: torch.dtype, options) -> bool:
    """Whether the inlined mods' tanh is the fast approximation: for half-precision inputs,
    unless ``APPROX_TANH`` is off. One rule for both kernels: the backward's recomputed
    probabilities must be the forward's."""
    return dtype in (torch.float16, torch.bfloat16) and options.flag("APPROX_TANH", True)


def lower_score_and_mask_mods(score_mod, mask_mod, dtype: torch.dtype, score_mod_buffers: Sequence,
                              mask_mod_buffers: Sequence, device, approx_tanh: bool):
    """``(score_buffer, mask_buffer)``: score_mod over (score, b, h, m, n) and mask_mod over
    (b, h, m, n), each reading its captured buffers, lowered to the inlinable expressions the
    templates' ``modification`` calls expand (subgraphs 0 and 1). Raises
    ``ModLoweringError`` when a mod needs more than one pointwise expression."""
    from .subgraphs import MASK_MOD_PLACEHOLDERS, SCORE_MOD_PLACEHOLDERS, build_mod_buffer

    score_buffer = build_mod_buffer(
        score_mod, SCORE_MOD_PLACEHOLDERS, (dtype,) + (torch.int32,) * 4,
        score_mod_buffers, device, approx_tanh=approx_tanh)
    mask_buffer = build_mod_buffer(
        mask_mod, MASK_MOD_PLACEHOLDERS, (torch.int32,) * 4, mask_mod_buffers, device)
    return score_buffer, mask_buffer


@dataclass
class InlinedMods:
    """score_mod and mask_mod ready for a template: the captured buffers, realized, and the
    two inlinable expressions (``modification`` subgraphs 0 and 1)."""
    score_mod_buffers: list
    mask_mod_buffers: list
    score_buffer: object
    mask_buffer: object
    has_score_mod: bool

    @property
    def subgraphs(self) -> list:
        return [self.score_buffer, self.mask_buffer]

    @property
    def captured(self) -> list:
        return self.score_mod_buffers + self.mask_mod_buffers


def inline_mods(score_mod, mask_mod, dtype: torch.dtype, score_mod_buffers: Sequence,
                mask_mod_buffers: Sequence, device, options) -> InlinedMods:
    """Realize the captured buffers and lower both mods for a forward-direction kernel;
    ``Declined`` when a mod cannot be inlined."""
    from .subgraphs import ModLoweringError, is_identity_score_mod

    score_mod_buffers = [realize_captured(b) for b in score_mod_buffers]
    mask_mod_buffers = [realize_captured(b) for b in mask_mod_buffers]
    try:
        score_buffer, mask_buffer = lower_score_and_mask_mods(
            score_mod, mask_mod, dtype, score_mod_buffers, mask_mod_buffers, device,
            approximate_tanh(dtype, options))
    except ModLoweringError as error:
        raise Declined(f"a mod the kernel cannot inline: {error}") from None
    return InlinedMods(score_mod_buffers, mask_mod_buffers, score_buffer, mask_buffer,
                       not is_identity_score_mod(score_mod))


def online_softmax_constants(options, has_score_mod: bool, scale: float) -> dict:
    """The constexprs of the online-softmax step (``attend_tile`` in common.py.jinja) that
    the kernel options and the scale decide, for every kernel that runs it."""
    prescale = options.flag("PRESCALE_QK")
    # With no score_mod and a positive scale, the scale folds into the base-2 conversion
    # (row max commutes with a positive factor), leaving one FMA per score.
    fold_scale = folds_scale(has_score_mod, scale)
    if fold_scale:
        logit_scale, qk_prescale = (1.0, scale * LOG2E) if prescale else (scale * LOG2E, 1.0)
    else:
        logit_scale, qk_prescale = LOG2E, scale
    return dict(
        HAS_SCORE_MOD=has_score_mod or not fold_scale,
        SM_SCALE=scale,
        LOGIT_SCALE=logit_scale,
        PRESCALE_QK=prescale,
        QK_PRESCALE=qk_prescale,
        ROWS_GUARANTEED_SAFE=options.flag("ROWS_GUARANTEED_SAFE"),
        BLOCKS_ARE_CONTIGUOUS=options.flag("BLOCKS_ARE_CONTIGUOUS"),
        WARP_SPECIALIZE=options.flag("WARP_SPECIALIZE"),
        FLOAT32_PRECISION=float32_precision(),
    )


def block_mask_kernel_inputs(mask, has_full_blocks: bool) -> tuple:
    """(the block-mask tensors a forward-direction kernel reads, realized, in its argument
    order; the ``(indices, partial)`` pairs ``block_mask_input_generators`` takes)."""
    inputs = [realize_fixed(mask.kv_num_blocks), realize_fixed(mask.kv_indices)]
    lists = [(mask.kv_indices, True)]
    if has_full_blocks:
        inputs += [realize_fixed(mask.full_kv_num_blocks), realize_fixed(mask.full_kv_indices)]
        lists.append((mask.full_kv_indices, False))
    return inputs, lists


def float32_precision() -> str:
    """The kernels' FLOAT32_PRECISION constant: how tl.dot multiplies float32 inputs,
    'ieee' where PyTorch's matmul settings ask for exact float32, else 'tf32'."""
    from inductor_flex import _compat

    return "'ieee'" if _compat.float32_matmul_is_ieee() else "'tf32'"
