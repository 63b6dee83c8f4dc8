"""Vendor attention kernels (cuDNN, FlashAttention-2 through their SDPA aten ops) for the
calls whose meaning they compute exactly.

A call qualifies when the block mask carries a proven pattern (``_mask_patterns``: ``full``,
or top-left ``causal`` with Q_LEN == KV_LEN), there is no score_mod and no captured buffer,
inputs are float16/bfloat16 with equal qk / v head dims the vendors take, the key/value
batch is the query's (GQA is fine: both ops take Hq a multiple of Hkv), and the layouts are
what the ops require (unit inner stride, 16-byte aligned strides and base). Forward: not
when max_scores is read (no vendor returns it). Backward: not when lse reached the loss
(the vendors' backward has no lse-gradient input), and not with GQA (their dK / dV lose
precision in the group sum; see ``lower_backward_vendor``).

Which kernel serves a qualifying call:

- ``max_autotune``: the vendors join our Triton configs in one ``autotune_select_algorithm``
  (``VendorChoice``): timed together, the fastest is emitted.
- otherwise the measured rule ``DEFAULT_RULES`` picks without timing; where no rule applies
  the candidate declines and the fused Triton kernel serves.

The backward needs only (q, k, v, out, lse, dO): both vendor backwards recompute the
probabilities from the natural-log lse, so a forward served by our kernel can be
differentiated by the vendor and the other way round (dropout 0: the philox seed and offset
are unread placeholders).

lse: both vendors return the natural-log lse, like ours; cuDNN's has a trailing unit dim
(``LSE_LAYOUTS``, ``lse_to_ours`` / ``lse_from_ours``).
"""
import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Tuple

import torch

from inductor_flex import _mask_patterns

PATTERNS = (_mask_patterns.FULL, _mask_patterns.CAUSAL)
# A switch for comparisons (on: tests/gpu/test_vendor_sdpa.py passed on the H200 and
# benchmarks/bench_{forward,backward}.py --triton-column measured the vendor faster than our
# kernel on full / causal). Other GPU tests take the vendors out (tests/gpu/conftest.py).
ENABLED = True
VENDORS = ("cudnn", "flash")
HALF_DTYPES = (torch.float16, torch.bfloat16)
# Head dims each op takes (multiples of 8; cuDNN's SDPA graphs to 128 on every generation).
MAX_HEAD_DIM = {"cudnn": 128, "flash": 256}


@dataclass(frozen=True)
class LseLayout:
    """How a vendor's lse differs from ours ([B, H, M] float32, natural log)."""
    trailing_unit_dim: bool
    log_base: float = math.e


LSE_LAYOUTS = {"cudnn": LseLayout(trailing_unit_dim=True), "flash": LseLayout(trailing_unit_dim=False)}


def lse_to_ours(vendor: str, lse, *, squeeze: Callable, multiply: Callable):
    """A vendor's lse in our layout and base; ``squeeze(x)`` drops the last dim and
    ``multiply(x, c)`` scales (tensor ops eagerly, IR lowerings in a graph)."""
    layout = LSE_LAYOUTS[vendor]
    if layout.trailing_unit_dim:
        lse = squeeze(lse)
    if layout.log_base != math.e:
        lse = multiply(lse, math.log(layout.log_base))
    return lse


def lse_from_ours(vendor: str, lse, *, unsqueeze: Callable, multiply: Callable):
    """Our lse as ``vendor``'s backward takes it (the inverse of ``lse_to_ours``)."""
    layout = LSE_LAYOUTS[vendor]
    if layout.log_base != math.e:
        lse = multiply(lse, 1.0 / math.log(layout.log_base))
    if layout.trailing_unit_dim:
        lse = unsqueeze(lse)
    return lse


# ---------------------------------------------------------------------------------------
# Pure decisions (plain Python: unit-tested on the CPU)
# ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class VendorCall:
    """What the decisions need to know about one call."""
    pattern: Optional[str]
    has_score_mod: bool
    num_buffers: int
    dtype: torch.dtype
    qk_head_dim: int
    v_head_dim: int
    same_kv_batch: bool
    equal_lengths: bool
    same_heads: bool = True  # no GQA
    backward: bool = False


def declined_reason(call: VendorCall) -> Optional[str]:
    """Why no vendor computes this call exactly (or, for the backward, as exactly as our
    kernel), or None when one may."""
    if call.pattern not in PATTERNS:
        return "the block mask has no proven full / causal pattern"
    if call.pattern == _mask_patterns.CAUSAL and not call.equal_lengths:
        return "causal needs Q_LEN == KV_LEN (top-left alignment)"
    if call.has_score_mod:
        return "a score_mod: the vendors apply none"
    if call.num_buffers:
        return "captured buffers: the vendors read none"
    if call.dtype not in HALF_DTYPES:
        return f"dtype {call.dtype}: the vendors take float16 / bfloat16 only"
    if call.qk_head_dim != call.v_head_dim:
        return "qk and v head dims differ"
    if not usable_vendors(call.dtype, call.qk_head_dim):
        return f"head dim {call.qk_head_dim}: no vendor takes it"
    if not call.same_kv_batch:
        return "key/value batch broadcasts: the vendors need the query's"
    if call.backward and not call.same_heads:
        # Measured on the H200 (cuDNN 9.19): with GQA the vendor's dK / dV sum the group's
        # heads after rounding each to the input dtype, 1.2x our eager error against the
        # float64 golden; our kernel accumulates the group in float32.
        return "GQA: the vendor backwards round each head's dK / dV before the group sum"
    return None


def usable_vendors(dtype: torch.dtype, head_dim: int) -> Tuple[str, ...]:
    if dtype not in HALF_DTYPES or head_dim % 8:
        return ()
    return tuple(v for v in VENDORS if head_dim <= MAX_HEAD_DIM[v])


@dataclass(frozen=True)
class VendorRule:
    """On GPUs of ``capability`` (major, minor), for these dtypes and head dims, the vendor
    that beats our fused kernel, per pass (None: ours)."""
    capability: Tuple[int, int]
    dtypes: Tuple[torch.dtype, ...]
    head_dims: Tuple[int, ...]
    forward: Optional[str]
    backward: Optional[str]


# Measured on an H200 (torch 2.11, cuDNN 9.19, bf16; B=4 H=16 S=8192 D=128 and B=8 H=16
# S=4096 D=64, full and causal), TFLOP/s: cuDNN forward 615 / 573 and 450 / 418, backward
# 531 / 505 and 428 / 379; flash forward 345 / 321 and 300 / 280, backward 302 / 289 and
# 268 / 231; ours (docs/kernels.md) forward 563 / 499, backward 416 / 407 at D=128. cuDNN
# leads everywhere; flash never. float16 runs the same cuDNN graphs.
DEFAULT_RULES = (
    VendorRule((9, 0), HALF_DTYPES, (64, 128), forward="cudnn", backward="cudnn"),
)


def default_vendor(capability: Tuple[int, int], dtype: torch.dtype, head_dim: int,
                   backward: bool) -> Optional[str]:
    """The vendor the measured rule picks without timing, or None (our kernel)."""
    for rule in DEFAULT_RULES:
        if tuple(capability) == rule.capability and dtype in rule.dtypes and head_dim in rule.head_dims:
            return rule.backward if backward else rule.forward
    return None


# ---------------------------------------------------------------------------------------
# The aten ops: direct calls (timing) and graph nodes (emission)
# ---------------------------------------------------------------------------------------

def _forward_args(vendor: str, query, key, value, is_causal: bool, scale: float,
                  with_lse: bool = True):
    if vendor == "cudnn":  # the only one that can skip the lse (flash always writes it)
        return (query, key, value, None, with_lse, 0.0, is_causal, False), {"scale": scale}
    return (query, key, value, 0.0, is_causal, False), {"scale": scale}


def _backward_args(vendor: str, grad_out, query, key, value, out, vendor_lse, seed, offset,
                   q_len, kv_len, is_causal: bool, scale: float):
    if vendor == "cudnn":
        return ((grad_out, query, key, value, out, vendor_lse, seed, offset, None, None, None,
                 q_len, kv_len, 0.0, is_causal), {"scale": scale})
    return ((grad_out, query, key, value, out, vendor_lse, None, None, q_len, kv_len, 0.0,
             is_causal, seed, offset), {"scale": scale})


def forward_op(vendor: str):
    aten = torch.ops.aten
    return {"cudnn": aten._scaled_dot_product_cudnn_attention.default,
            "flash": aten._scaled_dot_product_flash_attention.default}[vendor]


def backward_op(vendor: str):
    aten = torch.ops.aten
    return {"cudnn": aten._scaled_dot_product_cudnn_attention_backward.default,
            "flash": aten._scaled_dot_product_flash_attention_backward.default}[vendor]


def _time_forward(query, key, value, *unused, vendor, is_causal, scale):
    """A forward choice as autotuning runs it: the template's arguments in, the output out."""
    args, kwargs = _forward_args(vendor, query, key, value, is_causal, scale)
    return forward_op(vendor)(*args, **kwargs)[0]


def _time_backward(query, key, value, logsumexp, delta, grad_out, *unused, vendor, is_causal, scale):
    """A backward choice as autotuning runs it (the template's arguments carry no forward
    output: grad_out stands in for it, which changes no timing); returns dK."""
    seed = offset = torch.zeros((), dtype=torch.int64, device=query.device)
    vendor_lse = lse_from_ours(vendor, logsumexp, unsqueeze=lambda x: x.unsqueeze(-1),
                               multiply=torch.mul)
    args, kwargs = _backward_args(vendor, grad_out, query, key, value, grad_out, vendor_lse, seed,
                                  offset, query.shape[2], key.shape[2], is_causal, scale)
    return backward_op(vendor)(*args, **kwargs)[1]


def _ir_helpers():
    from torch._inductor.lowering import lowerings

    aten = torch.ops.aten
    return dict(squeeze=lambda x: lowerings[aten.squeeze.dim](x, -1),
                unsqueeze=lambda x: lowerings[aten.unsqueeze.default](x, -1),
                multiply=lambda x, c: lowerings[aten.mul.Tensor](x, c))


def _fallback(op, *args, **kwargs):
    from torch._inductor.lowering import fallback_handler

    return fallback_handler(op, add_to_fallback_set=False)(*args, **kwargs)


def emit_forward(vendor: str, query, key, value, is_causal: bool, scale: float,
                 lse_unread=None):
    """``(out, lse)`` of the vendor's forward as graph nodes, lse in our layout; when
    nothing reads the lse, ``lse_unread`` (a fill) stands in for it and cuDNN skips it, as
    SDPA does for inference."""
    args, kwargs = _forward_args(vendor, query, key, value, is_causal, scale,
                                 with_lse=lse_unread is None)
    outputs = _fallback(forward_op(vendor), *args, **kwargs)
    if lse_unread is not None:
        return outputs[0], lse_unread
    helpers = _ir_helpers()
    lse = lse_to_ours(vendor, outputs[1], squeeze=helpers["squeeze"], multiply=helpers["multiply"])
    return outputs[0], lse


def emit_backward(vendor: str, query, key, value, out, logsumexp, grad_out, is_causal: bool,
                  scale: float):
    """``(grad_query, grad_key, grad_value)`` of the vendor's backward as graph nodes."""
    from torch._inductor.lowering import full

    device = query.get_device()
    seed = full([], 0, dtype=torch.int64, device=device)
    offset = full([], 0, dtype=torch.int64, device=device)
    helpers = _ir_helpers()
    vendor_lse = lse_from_ours(vendor, logsumexp, unsqueeze=helpers["unsqueeze"],
                               multiply=helpers["multiply"])
    args, kwargs = _backward_args(vendor, grad_out, query, key, value, out, vendor_lse, seed,
                                  offset, query.get_size()[2], key.get_size()[2], is_causal, scale)
    outputs = _fallback(backward_op(vendor), *args, **kwargs)
    return outputs[0], outputs[1], outputs[2]


# ---------------------------------------------------------------------------------------
# Autotuning: the vendors as extern choices next to the templates
# ---------------------------------------------------------------------------------------

_extern_choices: dict = {}


def _extern_choice(name: str, kernel):
    """The ExternKernelChoice ``name`` (Inductor registers each name once per process)."""
    from torch._inductor.select_algorithm import ExternKernelChoice

    if name not in _extern_choices:
        _extern_choices[name] = ExternKernelChoice(kernel, name=name, has_out_variant=False)
    return _extern_choices[name]


def vendor_choice_factory(vendors: Sequence[str], backward: bool, is_causal: bool, scale: float,
                          emit: Callable[[str], tuple]):
    """``make(input_nodes, layout) -> [VendorChoice, ...]`` for ``common.choose_kernel``: one
    extern choice per vendor, timed through ``_time_forward`` / ``_time_backward`` on the
    template's arguments; the chosen one emits the vendor's own graph nodes (``emit(vendor)``
    returns the pass's outputs, the first being the one the templates write)."""
    from torch._inductor.select_algorithm import ExternKernelCaller

    class VendorChoice(ExternKernelCaller):
        def __init__(self, vendor, input_nodes, layout):
            kernel = _time_backward if backward else _time_forward
            name = f"inductor_flex_{vendor}_attention{'_backward' if backward else ''}"
            super().__init__(_extern_choice(name, kernel), input_nodes, layout,
                             dict(vendor=vendor, is_causal=is_causal, scale=scale),
                             has_out_variant=False)
            self.vendor = vendor
            self.outputs = None

        def output_node(self):
            self.outputs = emit(self.vendor)
            return self.outputs[0]

    def make(input_nodes, layout):
        return [VendorChoice(vendor, input_nodes, layout) for vendor in vendors]

    return make


def chosen(choices: Sequence, node) -> Optional[tuple]:
    """The outputs of the vendor choice autotuning picked (its output is ``node``), or None
    when a template won."""
    for choice in choices:
        if choice.outputs is not None and choice.outputs[0] is node:
            return choice.outputs
    return None


# ---------------------------------------------------------------------------------------
# The lowerings (dispatch.py candidates)
# ---------------------------------------------------------------------------------------

def _layout_usable(node) -> bool:
    """Unit inner stride, strides and base pointer 16-byte aligned: what the ops require."""
    from .common import base_pointer_aligned

    sizevars = _sizevars()
    strides = node.get_stride()
    elements = 16 // node.get_dtype().itemsize
    return (base_pointer_aligned(node) and sizevars.statically_known_equals(strides[-1], 1)
            and all(sizevars.statically_known_multiple_of(s, elements) for s in strides[:-1])
            and sizevars.statically_known_multiple_of(node.get_layout().offset, elements))


def _sizevars():
    from torch._inductor.virtualized import V

    return V.graph.sizevars


def _qualify(query, key, value, score_mod, block_mask, scale, kernel_options, buffers, mods,
             backward: bool):
    """``(problem, pattern, vendors)`` for a qualifying call; ``Declined`` otherwise."""
    import sympy

    from inductor_flex._block_lists import OperatorBlockMask

    from .common import attention_problem, known_true
    from .dispatch import Declined
    from .subgraphs import is_identity_score_mod

    if not ENABLED:
        raise Declined("switched off (lowering/vendor.ENABLED)")
    mask = OperatorBlockMask(*block_mask)
    # Read directly, never through the FWD_/BWD_ reader: only flex_attention sets it.
    pattern = (kernel_options or {}).get(_mask_patterns.PATTERN_KEY)
    if pattern not in PATTERNS:
        raise Declined("the block mask has no proven full / causal pattern")
    problem = attention_problem(query, key, value, mods + (mask.mask_mod,), mask.q_block_size,
                                mask.kv_block_size, scale, buffers)
    call = VendorCall(
        pattern=pattern, has_score_mod=not is_identity_score_mod(score_mod),
        num_buffers=len(buffers), dtype=problem.dtype, qk_head_dim=problem.qk_head_dim,
        v_head_dim=problem.v_head_dim,
        same_kv_batch=known_true(sympy.Eq(problem.kv_batch, problem.batch)),
        equal_lengths=known_true(sympy.Eq(problem.q_len, problem.kv_len)),
        same_heads=known_true(sympy.Eq(problem.q_heads, problem.kv_heads)), backward=backward)
    reason = declined_reason(call)
    if reason is not None:
        raise Declined(reason)
    return problem, pattern == _mask_patterns.CAUSAL, usable_vendors(problem.dtype, problem.qk_head_dim)


def _require_layouts(nodes):
    from .common import realize_fixed
    from .dispatch import Declined

    nodes = [realize_fixed(n) for n in nodes]
    if not all(_layout_usable(n) for n in nodes):
        raise Declined("a layout the vendor ops do not take (inner stride, 16-byte alignment)")
    return nodes


def lower_forward_vendor(query, key, value, score_mod, block_mask, scale, kernel_options,
                         score_mod_other_buffers=(), mask_mod_other_buffers=()):
    """The forward through a vendor kernel (``Declined`` where none qualifies or, outside
    max-autotune, where the measured rule prefers ours)."""
    from .common import output_used
    from .dispatch import Declined
    from .forward import lower_forward
    from .options import FORWARD, PassOptions

    buffers = list(score_mod_other_buffers) + list(mask_mod_other_buffers)
    problem, is_causal, vendors = _qualify(query, key, value, score_mod, block_mask, scale,
                                           kernel_options, buffers, (score_mod,), backward=False)
    options = PassOptions(kernel_options, FORWARD)
    if output_used(2, options.flag("OUTPUT_MAX", True)):
        raise Declined("max_scores is read: no vendor returns it")
    lse_read = output_used(1, True)
    query, key, value = _require_layouts((query, key, value))
    pick = default_vendor(problem.capability, problem.dtype, problem.qk_head_dim, backward=False)

    def emit(vendor):
        device = query.get_device()
        out, lse = emit_forward(vendor, query, key, value, is_causal, problem.scale,
                                lse_unread=None if lse_read else _unread_row_stat(problem, device))
        return out, lse, _unread_row_stat(problem, device)

    return _vendor_or_timed(
        problem, pick, vendors, False, is_causal, emit,
        lambda extra_choices: lower_forward(query, key, value, score_mod, block_mask, scale,
                                            kernel_options, score_mod_other_buffers,
                                            mask_mod_other_buffers, extra_choices=extra_choices))[1]


def _vendor_or_timed(problem, pick, vendors, backward: bool, is_causal: bool, emit, lower_ours):
    """What serves a qualifying call. Outside max-autotune: the measured rule's vendor
    (``Declined`` when it prefers ours). In max-autotune: the vendors timed next to our
    template configs in one selection (``lower_ours(extra_choices)``). Returns
    ``("vendor", emit's outputs)`` or ``("ours", our lowering's outputs)``."""
    from torch._inductor import config as inductor_config

    from .dispatch import Declined

    if not inductor_config.max_autotune:
        if pick is None:
            raise Declined(f"the measured rule prefers the fused kernel on sm{problem.capability[0]}"
                           f"{problem.capability[1]} for {problem.dtype}, D={problem.qk_head_dim}")
        return "vendor", emit(pick)
    make = vendor_choice_factory(vendors, backward, is_causal, problem.scale, emit)
    made = []

    def extra_choices(input_nodes, layout):
        made.extend(make(input_nodes, layout))
        return made

    try:
        outputs = lower_ours(extra_choices)
    except Declined:
        return "vendor", emit(pick or vendors[0])  # our kernel cannot serve; a vendor still can
    # The template's own output node: the forward's out, the backward's dK.
    won = chosen(made, outputs[1 if backward else 0])
    return ("vendor", won) if won else ("ours", outputs)


def _unread_row_stat(problem, device):
    """A per-row output (lse, max_scores) that nobody reads (checked by the caller): a fill
    that dead-code elimination drops."""
    from torch._inductor.lowering import full

    return full([problem.batch, problem.q_heads, problem.q_len], float("nan"),
                dtype=torch.float32, device=device)


def lower_backward_vendor(query, key, value, out, logsumexp, grad_out, grad_logsumexp,
                          fw_graph, joint_graph, block_mask, scale, kernel_options,
                          score_mod_other_buffers=(), mask_mod_other_buffers=()):
    """The backward through a vendor kernel (``Declined`` as for the forward, with GQA, and
    when the lse reached the loss)."""
    from .backward import lower_backward
    from .dispatch import Declined

    buffers = list(score_mod_other_buffers) + list(mask_mod_other_buffers)
    problem, is_causal, vendors = _qualify(query, key, value, fw_graph, block_mask, scale,
                                           kernel_options, buffers, (fw_graph, joint_graph),
                                           backward=True)
    if grad_logsumexp is not None:
        raise Declined("the lse reached the loss: the vendor backwards take no lse gradient")
    if grad_out.get_dtype() != problem.dtype:
        raise Declined(f"grad_out dtype {grad_out.get_dtype()} is not the inputs' {problem.dtype}")
    query, key, value, out, grad_out = _require_layouts((query, key, value, out, grad_out))
    if not all(_sizevars().statically_known_equals(a, b)
               for a, b in zip(out.get_stride(), grad_out.get_stride())):
        raise Declined("out and grad_out are laid out differently")
    pick = default_vendor(problem.capability, problem.dtype, problem.qk_head_dim, backward=True)

    def emit(vendor):
        grad_query, grad_key, grad_value = emit_backward(
            vendor, query, key, value, out, logsumexp, grad_out, is_causal, problem.scale)
        # dK first: the backward template's own output is dK.
        return grad_key, grad_query, grad_value

    served_by, outputs = _vendor_or_timed(
        problem, pick, vendors, True, is_causal, emit,
        lambda extra_choices: lower_backward(query, key, value, out, logsumexp, grad_out,
                                             grad_logsumexp, fw_graph, joint_graph, block_mask,
                                             scale, kernel_options, score_mod_other_buffers,
                                             mask_mod_other_buffers, extra_choices=extra_choices))
    if served_by == "ours":
        return outputs
    grad_key, grad_query, grad_value = outputs
    return grad_query, grad_key, grad_value, ()
