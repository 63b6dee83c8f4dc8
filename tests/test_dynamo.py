"""Dynamo capture of inductor_flex_attention (inductor_flex/dynamo.py).

What is checked: the captured graph (one operator node per call, score_mod / mask_mod as
GraphModule submodules, captured tensors passed as buffers), that every supported mod
pattern compiles with fullgraph=True and no graph break, recompilation rules, dynamic
shapes, several calls per graph, and numerics of the compiled function (backends "eager"
and "aot_eager") against eager and against a float64 reference.
"""
import functools
import math

import pytest
import torch
import torch._dynamo
import torch._dynamo.testing
from torch._dynamo.utils import counters

import inductor_flex
from inductor_flex import and_masks, create_block_mask, flex_attention, or_masks
from inductor_flex._mods import mask_mod_grid, score_mod_grid
from inductor_flex.dynamo import (
    InductorFlexAttentionVariable,
    getitem_with_index_tensors,
    route_tensor_indexing,
)
from inductor_flex.ops import inductor_flex_attention

BACKENDS = ("eager", "aot_eager")
B, H, M, E = 2, 3, 24, 16
BLOCK = 8


@pytest.fixture(autouse=True)
def fresh_counters(fresh_dynamo):
    counters.clear()


# ---------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------

def make_qkv(batch=B, heads=H, q_len=M, kv_len=M, head_dim=E, requires_grad=False, seed=0):
    generator = torch.Generator().manual_seed(seed)
    shapes = [(batch, heads, q_len, head_dim), (batch, heads, kv_len, head_dim),
              (batch, heads, kv_len, head_dim)]
    return [torch.randn(s, generator=generator).requires_grad_(requires_grad) for s in shapes]


def reference_attention(query, key, value, score_mod=None, mask_mod=None, scale=None):
    """Float64 attention by the definition: full score matrix, mods over the whole grid."""
    q, k, v = (t.detach().double() for t in (query, key, value))
    batch, heads, q_len, head_dim = q.shape
    kv_len = k.shape[2]
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    scores = scale * q @ k.transpose(-1, -2)
    grid = [torch.arange(n, dtype=torch.int32) for n in (batch, heads, q_len, kv_len)]
    if score_mod is not None:
        scores = score_mod_grid(score_mod, scores, *grid).double()
    if mask_mod is not None:
        scores = scores.masked_fill(~mask_mod_grid(mask_mod, *grid), -math.inf)
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - lse[..., None]).nan_to_num(0.0)
    return probs @ v, lse


def assert_close_to_reference(out, query, key, value, score_mod=None, mask_mod=None, scale=None):
    expected, _ = reference_attention(query, key, value, score_mod, mask_mod, scale)
    assert out.shape == expected.shape and out.dtype == query.dtype
    torch.testing.assert_close(out.double(), expected, atol=2e-5, rtol=2e-5)


class GraphRecorder:
    """A backend that keeps every graph Dynamo hands it and then runs ``backend``."""

    def __init__(self, backend="eager"):
        self.graphs = []
        self.backend = torch._dynamo.lookup_backend(backend)

    def __call__(self, gm, example_inputs):
        self.graphs.append(gm)
        return self.backend(gm, example_inputs)


def flex_nodes(gm):
    return [n for n in gm.graph.nodes
            if n.op == "call_function" and n.target is inductor_flex_attention]


def submodule(gm, node):
    assert node.op == "get_attr", node
    module = getattr(gm, node.target)
    assert isinstance(module, torch.fx.GraphModule)
    return module


def placeholders(gm):
    return [n for n in gm.graph.nodes if n.op == "placeholder"]


def example(node):
    return node.meta.get("example_value", node.meta.get("val"))


def graph_break_count():
    return sum(counters["graph_break"].values())


def compile_counted(fn, backend, **kwargs):
    counter = torch._dynamo.testing.CompileCounterWithBackend(backend)
    return torch.compile(fn, backend=counter, **kwargs), counter


def causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


# ---------------------------------------------------------------------------------------
# registration
# ---------------------------------------------------------------------------------------

def test_register_installs_the_variable_class_by_operator_name():
    from inductor_flex import _compat

    registry = _compat.dynamo_hop_variable_registry()
    assert registry["inductor_flex_attention"] is InductorFlexAttentionVariable
    inductor_flex.dynamo.register()  # idempotent
    assert registry["inductor_flex_attention"] is InductorFlexAttentionVariable


# ---------------------------------------------------------------------------------------
# graph structure
# ---------------------------------------------------------------------------------------

def test_captured_graph_has_one_node_with_subgraphs_and_buffers():
    bias = torch.randn(B, H, M)
    threshold = torch.randn(M)

    def score_mod(score, b, h, q_idx, kv_idx):
        return score + bias[b, h, kv_idx]

    def mask_mod(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) | (threshold[kv_idx] > 0)

    block_mask = create_block_mask(mask_mod, None, None, M, M, device="cpu", BLOCK_SIZE=BLOCK)

    def fn(q, k, v):
        return flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask)

    recorder = GraphRecorder()
    q, k, v = make_qkv()
    out = torch.compile(fn, backend=recorder, fullgraph=True)(q, k, v)

    (gm,) = recorder.graphs
    (node,) = flex_nodes(gm)
    (query, key, value, score_node, block_mask_arg, scale, kernel_options,
     score_buffers, mask_buffers) = node.args
    assert [example(n).shape for n in (query, key, value)] == [q.shape, k.shape, v.shape]
    assert len(block_mask_arg) == 13 and block_mask_arg[:2] == (M, M)
    assert block_mask_arg[10:12] == (BLOCK, BLOCK)
    assert scale == pytest.approx(1 / math.sqrt(E))
    assert isinstance(kernel_options, dict)

    score_gm = submodule(gm, score_node)
    mask_gm = submodule(gm, block_mask_arg[-1])
    # Explicit inputs first (0-d score in the query's dtype, int32 indices), then the
    # lifted closure tensors, which the node passes as buffers.
    score_inputs = [example(p) for p in placeholders(score_gm)]
    assert [(t.dim(), t.dtype) for t in score_inputs[:5]] == \
        [(0, torch.float32)] + [(0, torch.int32)] * 4
    assert [t.shape for t in score_inputs[5:]] == [bias.shape]
    mask_inputs = [example(p) for p in placeholders(mask_gm)]
    assert [(t.dim(), t.dtype) for t in mask_inputs[:4]] == [(0, torch.int32)] * 4
    assert [t.shape for t in mask_inputs[4:]] == [threshold.shape]
    assert len(score_buffers) == 1 and len(mask_buffers) == 1
    assert all(b.op == "placeholder" for b in (*score_buffers, *mask_buffers))

    # The subgraphs compute the mods when handed the captured tensors as buffers.
    idx = [torch.tensor(i, dtype=torch.int32) for i in (1, 2, 5, 7)]
    score = torch.tensor(0.25)
    torch.testing.assert_close(score_gm(score, *idx, bias), score_mod(score, *idx))
    for q_i, kv_i in [(5, 7), (7, 5), (3, 3)]:
        args = (idx[0], idx[1], torch.tensor(q_i, dtype=torch.int32),
                torch.tensor(kv_i, dtype=torch.int32))
        assert bool(mask_gm(*args, threshold)) == bool(mask_mod(*args))
    assert_close_to_reference(out, q, k, v, score_mod, mask_mod)


def test_kernel_options_stay_constants_when_a_value_changes_between_calls():
    # Dynamo makes an int that changed between calls symbolic; a kernel option must reach the
    # operator as a plain int (it picks the kernel and its launch), one graph per value.
    recorder = GraphRecorder()
    compiled = torch.compile(flex_attention, backend=recorder)
    q, k, v = make_qkv()
    for splits in (2, 3, 4):
        out = compiled(q, k, v, kernel_options={"SPLIT_KV": splits})
        assert_close_to_reference(out, q, k, v, None, None)
    options = [flex_nodes(gm)[0].args[6] for gm in recorder.graphs]
    assert [o["SPLIT_KV"] for o in options] == [2, 3, 4]
    assert all(type(o["SPLIT_KV"]) is int for o in options)


def test_given_buffers_come_before_lifted_ones():
    given = torch.randn(H)
    closed_over = torch.randn(M)
    block_tuple = create_block_mask(causal, None, None, M, M, device="cpu",
                                    BLOCK_SIZE=BLOCK).operator_tuple()

    def score_mod(score, b, h, q_idx, kv_idx, head_bias):
        return score + head_bias[h] + closed_over[q_idx]

    def fn(q, k, v):
        return inductor_flex_attention(q, k, v, score_mod, block_tuple, 0.5,
                                       {"OUTPUT_LOGSUMEXP": True, "OUTPUT_MAX": False},
                                       (given,), ())

    recorder = GraphRecorder()
    q, k, v = make_qkv()
    out, lse, _ = torch.compile(fn, backend=recorder, fullgraph=True)(q, k, v)
    (gm,) = recorder.graphs
    (node,) = flex_nodes(gm)
    score_buffers = node.args[7]
    assert [example(b).shape for b in score_buffers] == [given.shape, closed_over.shape]
    assert len(placeholders(submodule(gm, node.args[3]))) == 5 + 2

    def as_closure(score, b, h, q_idx, kv_idx):
        return score_mod(score, b, h, q_idx, kv_idx, given)

    expected_out, expected_lse = reference_attention(q, k, v, as_closure, causal, scale=0.5)
    torch.testing.assert_close(out.double(), expected_out, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(lse.double(), expected_lse, atol=2e-5, rtol=2e-5)


def test_missing_mods_are_recorded_as_identity_and_keep_all():
    # score_mod=None and a block mask tuple whose mask_mod slot is None, every block
    # listed as partial, so the recorded mask_mod alone decides what is visible.
    n_blocks = M // BLOCK
    kv_num = torch.full((1, 1, n_blocks), n_blocks, dtype=torch.int32)
    kv_idx = torch.arange(n_blocks, dtype=torch.int32).expand(1, 1, n_blocks, n_blocks).contiguous()
    block_tuple = (M, M, kv_num, kv_idx, None, None, kv_num, kv_idx, None, None,
                   BLOCK, BLOCK, None)

    def fn(q, k, v):
        return inductor_flex_attention(q, k, v, None, block_tuple, 0.25, {}, (), ())[0]

    recorder = GraphRecorder()
    q, k, v = make_qkv()
    out = torch.compile(fn, backend=recorder, fullgraph=True)(q, k, v)
    (gm,) = recorder.graphs
    (node,) = flex_nodes(gm)
    score_gm, mask_gm = submodule(gm, node.args[3]), submodule(gm, node.args[4][-1])
    idx = [torch.tensor(3, dtype=torch.int32)] * 4
    assert score_gm(torch.tensor(1.5), *idx).item() == 1.5
    assert mask_gm(*idx).dtype == torch.bool and bool(mask_gm(*idx))
    assert_close_to_reference(out, q, k, v, scale=0.25)


# ---------------------------------------------------------------------------------------
# mod patterns: fullgraph, no graph break, numerics
# ---------------------------------------------------------------------------------------

_bias_bq = torch.randn(B, M)
_bias_stack = torch.randn(4, B, H, M)
_table = torch.randn(B, H, 3, M)
_which = torch.tensor(2)
_head_slopes = torch.rand(H)
_temperature = torch.tensor(0.7)  # a 0-d captured tensor
_strided_view = _bias_stack[2, :, :, ::2]  # a non-contiguous view, [B, H, M // 2]


class _Doubled(torch.autograd.Function):
    """score -> 2 * score, written as an autograd.Function that vmap can run, with a
    custom backward (3 * grad) that is deliberately not the forward's derivative, so a
    gradient shows whether the custom rule was used."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        return 2 * x

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, grad):
        return 3 * grad


def _scaled(score, b, h, q_idx, kv_idx, factor):
    return score * factor


def _alibi(score, b, h, q_idx, kv_idx):
    return score - _head_slopes[h] * (q_idx - kv_idx)


def _tanh_cap(score, b, h, q_idx, kv_idx):
    return 3.0 * torch.tanh(score / 3.0)


def _window(b, h, q_idx, kv_idx):
    return (q_idx - kv_idx).abs() <= 5


def _even_kv(b, h, q_idx, kv_idx):
    return kv_idx % 2 == 0


MOD_PATTERNS = {
    "closure": (lambda s, b, h, q, kv: s + _bias_bq[b][q], causal),
    "functools_partial": (functools.partial(_scaled, factor=0.5),
                          functools.partial(lambda b, h, q, kv, width: q - kv < width, width=7)),
    "composed": (lambda s, b, h, q, kv: _tanh_cap(_alibi(s, b, h, q, kv), b, h, q, kv),
                 lambda b, h, q, kv: causal(b, h, q, kv) & _window(b, h, q, kv)),
    "and_masks": (None, and_masks(causal, _window)),
    "or_masks": (None, or_masks(_window, _even_kv)),
    "torch_where": (lambda s, b, h, q, kv: torch.where(q >= kv, s, s - 1.0),
                    lambda b, h, q, kv: torch.where(h == 1, q >= kv, kv >= 0)),
    "index_stacked": (lambda s, b, h, q, kv: s + _bias_stack[0][b, h][q], causal),
    "index_with_captured_scalar": (lambda s, b, h, q, kv: s * _table[b][h][_which, q],
                                   lambda b, h, q, kv: _table[b][h][_which, kv] > -1.0),
    "new_zeros": (lambda s, b, h, q, kv: s + h.new_zeros(h.shape),
                  lambda b, h, q, kv: kv <= q + h.new_zeros(h.shape)),
    "autograd_function": (lambda s, b, h, q, kv: _Doubled.apply(s), causal),
    "captured_scalar_and_view": (lambda s, b, h, q, kv: s * _temperature + _strided_view[b, h, q // 2],
                                 lambda b, h, q, kv: _strided_view[b, h, kv // 2] > _temperature - 2),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pattern", sorted(MOD_PATTERNS))
def test_mod_pattern_compiles_fullgraph_and_matches(pattern, backend):
    score_mod, mask_mod = MOD_PATTERNS[pattern]
    block_mask = create_block_mask(mask_mod, B, H, M, M, device="cpu", BLOCK_SIZE=BLOCK)

    def fn(q, k, v):
        return flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask)

    q, k, v = make_qkv()
    compiled, counter = compile_counted(fn, backend, fullgraph=True)
    out = compiled(q, k, v)
    assert counter.frame_count == 1
    assert graph_break_count() == 0
    torch.testing.assert_close(out, fn(q, k, v), atol=1e-6, rtol=1e-5)
    assert_close_to_reference(out, q, k, v, score_mod, mask_mod)


def test_mods_defined_inside_the_compiled_function():
    # Fresh closures per call, over a tensor computed inside the graph.
    def fn(q, k, v, offsets):
        shifted = offsets * 2

        def score_mod(score, b, h, q_idx, kv_idx):
            return score + shifted[q_idx]

        return flex_attention(q, k, v, score_mod=score_mod)

    q, k, v = make_qkv()
    offsets = torch.randn(M)
    compiled, counter = compile_counted(fn, "aot_eager", fullgraph=True)
    out = compiled(q, k, v, offsets)
    assert counter.frame_count == 1
    assert_close_to_reference(out, q, k, v, lambda s, b, h, qi, kvi: s + 2 * offsets[qi])


def test_autograd_function_with_grad_records_the_custom_rule():
    def score_mod(score, b, h, q_idx, kv_idx):
        return _Doubled.apply(score)

    def fn(q, k, v):
        return flex_attention(q, k, v, score_mod=score_mod)

    recorder = GraphRecorder("aot_eager")
    q, k, v = make_qkv(requires_grad=True)
    out = torch.compile(fn, backend=recorder, fullgraph=True)(q, k, v)
    (gm,) = recorder.graphs
    (node,) = flex_nodes(gm)
    score_gm = submodule(gm, node.args[3])
    targets = [n.target for n in score_gm.graph.nodes if n.op == "call_function"]
    assert torch.ops.higher_order.autograd_function_apply in targets
    assert_close_to_reference(out, q, k, v, score_mod)
    # Eager honours the custom backward; the compiled graph must too.
    expected = fn(q, k, v)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    expected_grads = torch.autograd.grad(expected.square().sum(), (q, k, v))
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_untraceable_mod_graph_breaks_and_still_computes():
    def score_mod(score, b, h, q_idx, kv_idx):
        torch._dynamo.graph_break()  # Dynamo cannot put this mod in one graph
        return score * 3.0

    def fn(q, k, v):
        return flex_attention(q, k, v, score_mod=score_mod) * 2

    q, k, v = make_qkv()
    with pytest.raises(torch._dynamo.exc.Unsupported):
        torch.compile(fn, backend="eager", fullgraph=True)(q, k, v)

    torch._dynamo.reset()
    counters.clear()
    out = torch.compile(fn, backend="eager")(q, k, v)
    assert graph_break_count() >= 1
    expected, _ = reference_attention(q, k, v, lambda s, *_: s * 3.0)
    torch.testing.assert_close(out.double(), 2 * expected, atol=2e-5, rtol=2e-5)


def test_mod_returning_a_tuple_is_rejected_with_a_clear_message():
    block_tuple = create_block_mask(causal, None, None, M, M, device="cpu",
                                    BLOCK_SIZE=BLOCK).operator_tuple()

    def score_mod(score, b, h, q_idx, kv_idx):
        return score, score

    def fn(q, k, v):
        return inductor_flex_attention(q, k, v, score_mod, block_tuple, 0.25, {}, (), ())[0]

    with pytest.raises(torch._dynamo.exc.Unsupported, match="score_mod must return one tensor"):
        torch.compile(fn, backend="eager", fullgraph=True)(*make_qkv())


def test_parameters_captured_by_a_mod_get_gradients():
    class RelativeBias(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.table = torch.nn.Parameter(torch.randn(2 * M - 1))
            self.gain = torch.nn.Parameter(torch.tensor(0.75))

        def forward(self, q, k, v):
            def score_mod(score, b, h, q_idx, kv_idx):
                return score * self.gain + self.table[q_idx - kv_idx + M - 1]

            return flex_attention(q, k, v, score_mod=score_mod)

    module = RelativeBias()
    q, k, v = make_qkv(requires_grad=True)
    recorder = GraphRecorder("aot_eager")
    out = torch.compile(module, backend=recorder, fullgraph=True)(q, k, v)
    (gm,) = recorder.graphs
    (node,) = flex_nodes(gm)
    buffer_shapes = sorted(tuple(example(b).shape) for b in node.args[7])
    assert buffer_shapes == [(), (2 * M - 1,)]
    assert all(example(b).requires_grad for b in node.args[7])

    expected = module(q, k, v)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-5)
    params = (q, module.table, module.gain)
    grads = torch.autograd.grad(out.square().sum(), params)
    expected_grads = torch.autograd.grad(expected.square().sum(), params)
    for got, want in zip(grads, expected_grads):
        assert got is not None
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------------------------------
# recompilation
# ---------------------------------------------------------------------------------------

_use_doubling = True


def _flagged(score, b, h, q_idx, kv_idx):
    return score * 2.0 if _use_doubling else score * 0.5


def test_changing_a_global_flag_read_by_the_mod_recompiles():
    global _use_doubling
    def fn(q, k, v):
        return flex_attention(q, k, v, score_mod=_flagged)

    q, k, v = make_qkv()
    compiled, counter = compile_counted(fn, "eager", fullgraph=True)
    try:
        _use_doubling = True
        first = compiled(q, k, v)
        _use_doubling = False
        second = compiled(q, k, v)
    finally:
        _use_doubling = True
    assert counter.frame_count == 2
    assert_close_to_reference(first, q, k, v, lambda s, *_: s * 2.0)
    assert_close_to_reference(second, q, k, v, lambda s, *_: s * 0.5)


def test_changing_a_captured_tensor_in_place_does_not_recompile():
    bias = torch.zeros(M)

    def score_mod(score, b, h, q_idx, kv_idx):
        return score + bias[kv_idx]

    def fn(q, k, v):
        return flex_attention(q, k, v, score_mod=score_mod)

    q, k, v = make_qkv()
    compiled, counter = compile_counted(fn, "aot_eager", fullgraph=True)
    compiled(q, k, v)
    bias.copy_(torch.randn(M))
    out = compiled(q, k, v)
    assert counter.frame_count == 1
    assert_close_to_reference(out, q, k, v, score_mod)


# ---------------------------------------------------------------------------------------
# dynamic shapes
# ---------------------------------------------------------------------------------------

# (batch, heads, sequence length): every dim changes between calls. In the first two
# shapes no two sizes are equal, block counts (length / 8) and the head dim included:
# Dynamo specializes 0 and 1, and duck sizing would tie equal sizes of the first compile.
SHAPES = [(2, 3, 40), (3, 4, 56), (4, 2, 72)]
_rel_bias = torch.randn(128)


def _rel_score(score, b, h, q_idx, kv_idx):
    return score + _rel_bias[(q_idx - kv_idx).abs()]


def _outside_mask_fn(q, k, v, block_mask):
    return flex_attention(q, k, v, score_mod=_rel_score, block_mask=block_mask)


def _inside_mask_fn(q, k, v):
    block_mask = create_block_mask(causal, None, None, q.shape[2], k.shape[2], device="cpu",
                                   BLOCK_SIZE=BLOCK)
    return flex_attention(q, k, v, score_mod=_rel_score, block_mask=block_mask)


def _run_shapes(compiled, mask_inside, shapes=SHAPES):
    for batch, heads, seq in shapes:
        q, k, v = make_qkv(batch, heads, seq, seq)
        if mask_inside:
            out = compiled(q, k, v)
        else:
            block_mask = create_block_mask(causal, None, None, seq, seq, device="cpu",
                                           BLOCK_SIZE=BLOCK)
            out = compiled(q, k, v, block_mask)
        assert_close_to_reference(out, q, k, v, _rel_score, causal)


@pytest.mark.parametrize("mask_inside", [False, True], ids=["mask_as_input", "mask_inside"])
def test_dynamic_true_compiles_one_frame_for_all_sizes(mask_inside):
    fn = _inside_mask_fn if mask_inside else _outside_mask_fn
    recorder = GraphRecorder("aot_eager")
    # Two shapes show whether the second one recompiles.
    _run_shapes(torch.compile(fn, backend=recorder, dynamic=True), mask_inside, SHAPES[:2])
    assert graph_break_count() == 0
    assert len(recorder.graphs) == 1
    (node,) = flex_nodes(recorder.graphs[0])
    block_mask_arg = node.args[4]
    # Lengths stay symbolic; block sizes are specialized ints (they shape the kernels).
    assert all(isinstance(n, torch.fx.Node) for n in block_mask_arg[:2])
    assert block_mask_arg[10:12] == (BLOCK, BLOCK)
    assert all(type(size) is int for size in block_mask_arg[10:12])


@pytest.mark.parametrize("mask_inside", [False, True], ids=["mask_as_input", "mask_inside"])
def test_automatic_dynamic_compiles_static_then_dynamic(mask_inside):
    fn = _inside_mask_fn if mask_inside else _outside_mask_fn
    compiled, counter = compile_counted(fn, "aot_eager")
    # Static, then dynamic; the third shape must reuse the dynamic frame.
    _run_shapes(compiled, mask_inside)
    assert counter.frame_count == 2
    assert graph_break_count() == 0


def test_mod_reading_a_symbolic_size_keeps_it_symbolic():
    # Under dynamic shapes a window derived from the length is a SymInt; the mod's
    # subgraph takes it as a buffer, so one frame serves every length.
    def fn(q, k, v):
        window = q.shape[2] // 4

        def score_mod(score, b, h, q_idx, kv_idx):
            return torch.where((q_idx - kv_idx).abs() <= window, score, score - 5.0)

        return flex_attention(q, k, v, score_mod=score_mod)

    recorder = GraphRecorder("aot_eager")
    compiled = torch.compile(fn, backend=recorder, dynamic=True, fullgraph=True)
    for batch, heads, seq in SHAPES[:2]:
        q, k, v = make_qkv(batch, heads, seq, seq)
        window = seq // 4
        assert_close_to_reference(
            compiled(q, k, v), q, k, v,
            lambda s, b, h, qi, kvi: torch.where((qi - kvi).abs() <= window, s, s - 5.0))
    assert len(recorder.graphs) == 1
    (node,) = flex_nodes(recorder.graphs[0])
    assert [type(example(b)) for b in node.args[7]] == [torch.SymInt]


# ---------------------------------------------------------------------------------------
# several calls per graph, block masks as inputs
# ---------------------------------------------------------------------------------------

def test_several_calls_in_one_graph_get_their_own_subgraphs():
    scale_bias = torch.randn(H)
    causal_mask = create_block_mask(causal, None, None, M, M, device="cpu", BLOCK_SIZE=BLOCK)
    window_mask = create_block_mask(_window, None, None, M, M, device="cpu", BLOCK_SIZE=BLOCK)

    def head_bias(score, b, h, q_idx, kv_idx):
        return score + scale_bias[h]

    def fn(q, k, v):
        first = flex_attention(q, k, v, score_mod=head_bias, block_mask=causal_mask)
        second = flex_attention(first, k, v, score_mod=_tanh_cap, block_mask=window_mask)
        third = flex_attention(q, second, first, block_mask=causal_mask)
        return first, second, third

    recorder = GraphRecorder("eager")
    q, k, v = make_qkv()
    first, second, third = torch.compile(fn, backend=recorder, fullgraph=True)(q, k, v)
    (gm,) = recorder.graphs
    nodes = flex_nodes(gm)
    assert len(nodes) == 3
    names = [n.args[3].target for n in nodes] + [n.args[4][-1].target for n in nodes]
    assert len(set(names)) == 6
    # Outputs feed inputs: the second call's query is the first call's output.
    assert nodes[1].args[0].args[0] is nodes[0]
    assert [len(n.args[7]) for n in nodes] == [1, 0, 0]

    exp_first, _ = reference_attention(q, k, v, head_bias, causal)
    exp_second, _ = reference_attention(first, k, v, _tanh_cap, _window)
    exp_third, _ = reference_attention(q, second, first, None, causal)
    for got, want in [(first, exp_first), (second, exp_second), (third, exp_third)]:
        torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=2e-5)


def test_block_mask_as_input_and_created_inside():
    # "eager" is enough here: the dynamic-shape tests run both forms under "aot_eager".
    backend = "eager"

    def with_input(q, k, v, block_mask):
        return flex_attention(q, k, v, score_mod=_alibi, block_mask=block_mask)

    def created_inside(q, k, v):
        block_mask = create_block_mask(_window, B, H, M, M, device="cpu", BLOCK_SIZE=BLOCK)
        return flex_attention(q, k, v, score_mod=_alibi, block_mask=block_mask)

    q, k, v = make_qkv()
    block_mask = create_block_mask(_window, B, H, M, M, device="cpu", BLOCK_SIZE=BLOCK)
    compiled, counter = compile_counted(with_input, backend, fullgraph=True)
    out_input = compiled(q, k, v, block_mask)
    compiled_inside, counter_inside = compile_counted(created_inside, backend, fullgraph=True)
    out_inside = compiled_inside(q, k, v)
    assert counter.frame_count == 1 and counter_inside.frame_count == 1
    assert_close_to_reference(out_input, q, k, v, _alibi, _window)
    assert_close_to_reference(out_inside, q, k, v, _alibi, _window)


# ---------------------------------------------------------------------------------------
# indexing with index tensors
# ---------------------------------------------------------------------------------------

def _int(i, dtype=torch.int32):
    return torch.tensor(i, dtype=dtype)


@pytest.mark.parametrize("index_of", [
    lambda: _int(2),
    lambda: (_int(1), _int(3)),
    lambda: (1, _int(3)),
    lambda: (_int(1), 2),
    lambda: (slice(None), _int(3)),
    lambda: (slice(1, 3), _int(3), 1),
    lambda: (Ellipsis, _int(4)),
    lambda: (_int(1), Ellipsis, _int(0)),
    lambda: (_int(1, torch.int64), slice(None), torch.tensor([0, 3, 4])),
    lambda: (torch.tensor([1, 0]), 2, torch.tensor([4, 0])),
    lambda: (slice(None), torch.tensor([[1, 0]]), slice(None, None, 2)),
], ids=["one", "two", "int_then_tensor", "tensor_then_int", "slice_tensor", "slice_tensor_int",
        "ellipsis", "tensor_ellipsis_tensor", "scalar_slice_vector", "vector_int_vector",
        "matrix_between_slices"])
def test_getitem_with_index_tensors_matches_tensor_indexing(index_of):
    source = torch.randn(3, 4, 5, 6)
    index = index_of()
    torch.testing.assert_close(getitem_with_index_tensors(source, index), source[index])


def test_getitem_with_index_tensors_under_vmap():
    source = torch.randn(4, 6)
    rows = torch.arange(4, dtype=torch.int32)
    cols = torch.tensor([5, 0, 3], dtype=torch.int32)
    grid = torch.vmap(torch.vmap(lambda r, c: getitem_with_index_tensors(source, (r, c)),
                                 in_dims=(None, 0)), in_dims=(0, None))(rows, cols)
    torch.testing.assert_close(grid, source[:, cols.long()])


def test_getitem_with_index_tensors_rejects_what_it_cannot_translate():
    source = torch.randn(3, 4)
    with pytest.raises(ValueError, match="unsupported index"):
        getitem_with_index_tensors(source, (None, _int(1)))
    with pytest.raises(ValueError, match="unsupported index"):
        getitem_with_index_tensors(source, torch.tensor(True))
    with pytest.raises(IndexError, match="too many indices"):
        getitem_with_index_tensors(source, (_int(0), _int(1), _int(2)))


def test_route_tensor_indexing_rewrites_only_tensor_indexed_getitems():
    table = torch.randn(4, M)
    recorder = GraphRecorder()

    def score_mod(score, b, h, q_idx, kv_idx):
        return score + table[h, q_idx] + table[1][2]

    block_tuple = create_block_mask(causal, None, None, M, M, device="cpu",
                                    BLOCK_SIZE=BLOCK).operator_tuple()

    def fn(q, k, v):
        return inductor_flex_attention(q, k, v, score_mod, block_tuple, 0.25, {}, (), ())[0]

    q, k, v = make_qkv(heads=4, q_len=M, kv_len=M)
    torch.compile(fn, backend=recorder, fullgraph=True)(q, k, v)
    (gm,) = recorder.graphs
    score_gm = submodule(gm, flex_nodes(gm)[0].args[3])
    targets = [n.target for n in score_gm.graph.nodes if n.op == "call_function"]
    assert targets.count(getitem_with_index_tensors) == 1
    # table[1][2] has plain int indices: it stays an ordinary getitem.
    import operator
    assert targets.count(operator.getitem) == 2
    # Running the rewrite again changes nothing.
    before = score_gm.code
    route_tensor_indexing(score_gm)
    assert score_gm.code == before
