"""The operators' registrations (inductor_flex/ops/forward.py, ops/backward.py).

Checked here: fake shapes, dtypes and strides (transposed query, GQA, Ev != E, backward
layouts), the graphs make_fx records (pinned inline, for an empty and for the core ATen
decomposition table), functionalization refusing mutating mods, the dense registration
against a float64 reference, autocast, and the extern custom ops' source round trip.

The helpers at the top (block mask tuple, float64 reference) are shared by
test_autograd.py and test_compile_cpu.py.
"""
import math

import expecttest
import pytest
import torch
from torch._decomp import core_aten_decompositions
from torch._higher_order_ops.utils import UnsupportedAliasMutationException
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.proxy_tensor import make_fx

import inductor_flex  # noqa: F401  (registers everything)
from inductor_flex.ops import inductor_flex_attention, inductor_flex_attention_backward
from inductor_flex.ops.autograd import build_joint_graph

# ---------------------------------------------------------------------------------------
# shared helpers
# ---------------------------------------------------------------------------------------


def partial_block_mask(q_len, kv_len, mask_mod, block=8, with_full=False):
    """Block mask tuple (docs/internals.md) listing every block as partial, so mask_mod
    alone decides. ``with_full`` lists them as full instead (mask_mod skipped)."""
    nq, nk = -(-q_len // block), -(-kv_len // block)
    counts_kv = torch.full((1, 1, nq), nk, dtype=torch.int32)
    indices_kv = torch.arange(nk, dtype=torch.int32).expand(1, 1, nq, nk).contiguous()
    counts_q = torch.full((1, 1, nk), nq, dtype=torch.int32)
    indices_q = torch.arange(nq, dtype=torch.int32).expand(1, 1, nk, nq).contiguous()
    zero_kv, zero_q = torch.zeros_like(counts_kv), torch.zeros_like(counts_q)
    if with_full:
        return (q_len, kv_len, zero_kv, indices_kv, counts_kv, indices_kv, zero_q, indices_q,
                counts_q, indices_q, block, block, mask_mod)
    return (q_len, kv_len, counts_kv, indices_kv, None, None, counts_q, indices_q, None, None,
            block, block, mask_mod)


def causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def keep_all(b, h, q_idx, kv_idx):
    return q_idx >= 0


def identity(score, b, h, q_idx, kv_idx):
    return score


def naive_attention(query, key, value, score_mod, mask_mod, scale):
    """Float64 attention by the definition, differentiable by autograd.

    The mods are evaluated once over the whole grid by broadcasting: b, h, q_idx, kv_idx
    are int32 tensors shaped to broadcast against ``[B, Hq, M, N]``. Returns (out, lse);
    rows that keep nothing give out 0, lse -inf.
    """
    q, k, v = (t.double() for t in (query, key, value))
    batch, q_heads, q_len, _ = q.shape
    group = q_heads // k.shape[1]
    k = k.expand(batch, -1, -1, -1).repeat_interleave(group, dim=1)
    v = v.expand(batch, -1, -1, -1).repeat_interleave(group, dim=1)
    kv_len = k.shape[2]
    grid = [torch.arange(n, dtype=torch.int32).view([-1 if d == i else 1 for d in range(4)])
            for i, n in enumerate((batch, q_heads, q_len, kv_len))]
    scores = score_mod(scale * q @ k.transpose(-1, -2), *grid).double()
    keep = mask_mod(*grid).expand(scores.shape)
    scores = scores.masked_fill(~keep, -math.inf)
    row_max = scores.amax(-1, keepdim=True).detach()
    shift = torch.where(row_max == -math.inf, torch.zeros_like(row_max), row_max)
    weights = torch.exp(scores - shift)
    denominator = weights.sum(-1, keepdim=True)
    out = (weights @ v) / torch.where(denominator == 0, torch.ones_like(denominator), denominator)
    lse = (denominator.log() + shift).squeeze(-1)
    return out, lse


def qkv(batch=2, q_heads=4, kv_heads=2, q_len=16, kv_len=24, head_dim=8, value_dim=8,
        kv_batch=None, dtype=torch.float32, requires_grad=False, seed=0):
    generator = torch.Generator().manual_seed(seed)
    kv_batch = batch if kv_batch is None else kv_batch
    shapes = [(batch, q_heads, q_len, head_dim), (kv_batch, kv_heads, kv_len, head_dim),
              (kv_batch, kv_heads, kv_len, value_dim)]
    return [torch.randn(s, generator=generator, dtype=dtype).requires_grad_(requires_grad)
            for s in shapes]


def dense_layout_strides(shape, order):
    """Strides of a dense tensor whose dims, outermost first, are ``order``."""
    strides = [0] * len(shape)
    running = 1
    for d in reversed(order):
        strides[d] = running
        running *= shape[d]
    return tuple(strides)


# ---------------------------------------------------------------------------------------
# fake
# ---------------------------------------------------------------------------------------

OPTIONS = {"OUTPUT_LOGSUMEXP": True, "OUTPUT_MAX": True}


def test_fake_gqa_value_dim_dtype():
    with FakeTensorMode():
        query, key, value = qkv(q_heads=6, kv_heads=2, head_dim=8, value_dim=12, dtype=torch.bfloat16)
        out, lse, max_scores = inductor_flex_attention(
            query, key, value, identity, partial_block_mask(16, 24, causal), 0.5, OPTIONS)
    assert (out.shape, out.dtype, out.stride()) == ((2, 6, 16, 12), torch.bfloat16, (1152, 192, 12, 1))
    for stat in (lse, max_scores):
        assert (stat.shape, stat.dtype, stat.stride()) == ((2, 6, 16), torch.float32, (96, 16, 1))


@pytest.mark.parametrize("order", [(0, 2, 1, 3), (2, 0, 1, 3), (1, 0, 2, 3)])
def test_fake_out_follows_query_memory_order(order):
    batch, heads, q_len, head_dim, value_dim = 2, 4, 16, 8, 12
    shape = (batch, heads, q_len, head_dim)
    physical = torch.randn([shape[d] for d in order])
    query = physical.permute([order.index(d) for d in range(4)])  # logical [B, H, M, E]
    _, key, value = qkv(q_heads=heads, kv_heads=heads, value_dim=value_dim)
    expected = dense_layout_strides((batch, heads, q_len, value_dim), order)

    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fake = [mode.from_tensor(t) for t in (query, key, value)]
        out, lse, _ = inductor_flex_attention(*fake, identity, partial_block_mask(16, 24, causal),
                                              0.5, OPTIONS)
    assert out.shape == (batch, heads, q_len, value_dim)
    assert out.stride() == expected
    assert lse.is_contiguous()
    # The dense implementation produces the same layout the fake rule promises.
    real_out, _, _ = inductor_flex_attention(query, key, value, identity,
                                             partial_block_mask(16, 24, causal), 0.5, OPTIONS)
    assert real_out.stride() == expected


def test_fake_backward_layouts_and_buffer_grads():
    query, key, value = qkv(q_heads=4, kv_heads=2, value_dim=12)
    key = key.transpose(1, 2).contiguous().transpose(1, 2)  # non-contiguous key
    bias = torch.randn(4, 16)
    table = torch.randn(24)
    out = torch.empty(2, 4, 16, 12)
    lse = torch.empty(2, 4, 16)

    def score_mod(score, b, h, q_idx, kv_idx, bias, table):
        return score + bias[h, q_idx] + table[kv_idx]

    joint = build_joint_graph(score_mod, query, (bias, table), [True, False])
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fakes = [mode.from_tensor(t) for t in (query, key, value, out, lse, out, bias, table)]
        f_query, f_key, f_value, f_out, f_lse, f_grad_out, f_bias, f_table = fakes
        grad_query, grad_key, grad_value, grad_buffers = inductor_flex_attention_backward(
            f_query, f_key, f_value, f_out, f_lse, f_grad_out, None, score_mod, joint,
            partial_block_mask(16, 24, causal), 0.5, OPTIONS, (f_bias, f_table), ())
    for grad, like in ((grad_query, query), (grad_key, key), (grad_value, value)):
        assert (grad.shape, grad.dtype, grad.stride()) == (like.shape, like.dtype, like.stride())
    assert grad_buffers[0].shape == bias.shape and grad_buffers[0].stride() == bias.stride()
    assert grad_buffers[1] is None


# ---------------------------------------------------------------------------------------
# proxy (make_fx)
# ---------------------------------------------------------------------------------------

def _floor_div_score_mod(score, b, h, q_idx, kv_idx):
    return score * (q_idx // (1 + kv_idx))


def _traced_forward(decomposition_table):
    query, key, value = qkv(batch=1, q_heads=2, kv_heads=2, q_len=8, kv_len=8)

    def f(query, key, value):
        out, lse, _ = inductor_flex_attention(query, key, value, _floor_div_score_mod,
                                              partial_block_mask(8, 8, causal), 0.25,
                                              {"OUTPUT_LOGSUMEXP": True})
        return out, lse

    return make_fx(f, decomposition_table=decomposition_table, tracing_mode="fake")(query, key, value)


def _code(graph_module, name):
    return getattr(graph_module, name).code.strip()


def test_make_fx_no_decompositions_keeps_floor_divide():
    traced = _traced_forward({})
    call = [n for n in traced.graph.nodes if n.target is inductor_flex_attention]
    assert len(call) == 1
    expecttest.assert_expected_inline(_code(traced, "flex_score_mod_0"), """\
def forward(self, score_1, b_1, h_1, q_idx_1, kv_idx_1):
    add = torch.ops.aten.add.Tensor(kv_idx_1, 1);  kv_idx_1 = None
    floor_divide = torch.ops.aten.floor_divide.default(q_idx_1, add);  q_idx_1 = add = None
    mul = torch.ops.aten.mul.Tensor(score_1, floor_divide);  score_1 = floor_divide = None
    return mul""")
    expecttest.assert_expected_inline(_code(traced, "flex_mask_mod_0"), """\
def forward(self, b_1, h_1, q_idx_1, kv_idx_1):
    ge = torch.ops.aten.ge.Tensor(q_idx_1, kv_idx_1);  q_idx_1 = kv_idx_1 = None
    return ge""")
    line = next(l.strip() for l in traced.code.splitlines() if "inductor_flex_attention(" in l)
    expecttest.assert_expected_inline(line, """\
inductor_flex_attention = torch.ops.higher_order.inductor_flex_attention(query_1, key_1, value_1, flex_score_mod_0, (8, 8, full, expand, None, None, full_1, expand_1, None, None, 8, 8, flex_mask_mod_0), 0.25, {'OUTPUT_LOGSUMEXP': True}, (), ());  query_1 = key_1 = value_1 = flex_score_mod_0 = full = expand = full_1 = expand_1 = flex_mask_mod_0 = None""")


def test_make_fx_core_aten_decomposes_floor_divide():
    traced = _traced_forward(core_aten_decompositions())
    expecttest.assert_expected_inline(_code(traced, "flex_score_mod_0"), """\
def forward(self, score_1, b_1, h_1, q_idx_1, kv_idx_1):
    add = torch.ops.aten.add.Tensor(kv_idx_1, 1);  kv_idx_1 = None
    div = torch.ops.aten.div.Tensor_mode(q_idx_1, add, rounding_mode = 'floor');  q_idx_1 = add = None
    mul = torch.ops.aten.mul.Tensor(score_1, div);  score_1 = div = None
    return mul""")


def test_make_fx_names_each_call_s_mods_apart():
    query, key, value = qkv(batch=1, q_heads=2, kv_heads=2, q_len=8, kv_len=8)

    def f(query, key, value):
        first, _, _ = inductor_flex_attention(query, key, value, identity,
                                              partial_block_mask(8, 8, causal), 0.25, {})
        second, _, _ = inductor_flex_attention(first, key, value, _floor_div_score_mod,
                                               partial_block_mask(8, 8, keep_all), 0.25, {})
        return second

    traced = make_fx(f, tracing_mode="fake")(query, key, value)
    names = sorted(name for name, _ in traced.named_children())
    assert names == ["flex_mask_mod_0", "flex_mask_mod_1", "flex_score_mod_0", "flex_score_mod_1"]
    assert "floor_divide" in traced.flex_score_mod_1.code
    assert "floor_divide" not in traced.flex_score_mod_0.code


def test_make_fx_captured_buffer_indexing_and_backward_graph():
    """AOTAutograd over a call with a bias table buffer: the forward graph carries the
    buffer; the backward graph calls the backward operator with the joint graph."""
    from functorch.compile import aot_function, make_boxed_func

    query, key, value = qkv(batch=1, q_heads=2, kv_heads=2, q_len=8, kv_len=8, requires_grad=True)
    bias = torch.randn(2, 8, requires_grad=True)
    graphs = {}

    def score_mod(score, b, h, q_idx, kv_idx, bias):
        return score + bias[h, q_idx]

    def f(query, key, value, bias):
        out, _, _ = inductor_flex_attention(query, key, value, score_mod,
                                            partial_block_mask(8, 8, causal), 0.25, {}, (bias,), ())
        return out

    def keep(name):
        def compiler(graph_module, _):
            graphs[name] = graph_module
            return make_boxed_func(graph_module)
        return compiler

    aot_function(f, keep("forward"), keep("backward"))(query, key, value, bias).sum().backward()
    backward = graphs["backward"]
    joint_names = [name for name, _ in backward.named_children() if name.startswith("flex_bw_joint")]
    assert joint_names == ["flex_bw_joint_0"]
    expecttest.assert_expected_inline(_code(backward, "flex_bw_joint_0"), """\
def forward(self, arg0_1, arg1_1, arg2_1, arg3_1, arg4_1, arg5_1, arg6_1):
    new_zeros = torch.ops.aten.new_zeros.default(arg5_1, [2, 8], dtype = torch.float32, layout = torch.strided, device = device(type='cpu'))
    index_put = torch.ops.aten.index_put.default(new_zeros, [arg2_1, arg3_1], arg5_1, True);  new_zeros = arg2_1 = arg3_1 = None
    return (arg5_1, index_put)""")
    calls = [n for n in backward.graph.nodes if n.target is inductor_flex_attention_backward]
    assert len(calls) == 1
    # The forward asked for no lse, but the backward needs it: the autograd rule asks.
    forward_call = next(n for n in graphs["forward"].graph.nodes if n.target is inductor_flex_attention)
    assert forward_call.args[6]["OUTPUT_LOGSUMEXP"] is True
    assert bias.grad is not None and bias.grad.shape == bias.shape


# ---------------------------------------------------------------------------------------
# functionalization
# ---------------------------------------------------------------------------------------

def test_functionalize_rejects_score_mod_mutating_a_buffer():
    query, key, value = qkv()
    counter = torch.zeros(())

    def mutating_score_mod(score, b, h, q_idx, kv_idx, counter):
        counter.add_(1)
        return score + counter

    def f(query, key, value, counter):
        return inductor_flex_attention(query, key, value, mutating_score_mod,
                                       partial_block_mask(16, 24, causal), 0.5, {}, (counter,), ())[0]

    with pytest.raises(UnsupportedAliasMutationException, match="score_mod mutates"):
        torch.func.functionalize(f)(query, key, value, counter)


def test_functionalize_rejects_mask_mod_mutating_a_buffer():
    query, key, value = qkv()
    seen = torch.zeros((), dtype=torch.int32)

    def mutating_mask_mod(b, h, q_idx, kv_idx, seen):
        seen.add_(1)
        return q_idx >= kv_idx

    def f(query, key, value, seen):
        return inductor_flex_attention(query, key, value, identity,
                                       partial_block_mask(16, 24, mutating_mask_mod), 0.5, {},
                                       (), (seen,))[0]

    with pytest.raises(UnsupportedAliasMutationException, match="mask_mod mutates"):
        torch.func.functionalize(f)(query, key, value, seen)


def test_functionalize_accepts_pure_mods():
    query, key, value = qkv()
    bias = torch.randn(4)

    def f(query, key, value, bias):
        return inductor_flex_attention(query, key, value, lambda s, b, h, q, kv, bias: s + bias[h],
                                       partial_block_mask(16, 24, causal), 0.5, {}, (bias,), ())[0]

    expected = f(query, key, value, bias)
    torch.testing.assert_close(torch.func.functionalize(f)(query, key, value, bias), expected)


# ---------------------------------------------------------------------------------------
# dense registration, autocast
# ---------------------------------------------------------------------------------------

def test_dense_registration_matches_float64_reference():
    query, key, value = qkv(q_heads=4, kv_heads=2, value_dim=12)
    bias = torch.randn(4, 16)

    def score_mod(score, b, h, q_idx, kv_idx):
        return score + bias[h, q_idx]

    out, lse, max_scores = inductor_flex_attention(query, key, value, score_mod,
                                                   partial_block_mask(16, 24, causal), 0.5, OPTIONS)
    expected_out, expected_lse = naive_attention(query, key, value, score_mod, causal, 0.5)
    torch.testing.assert_close(out, expected_out.float(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, expected_lse.float(), atol=1e-5, rtol=1e-5)
    assert max_scores.dtype == torch.float32 and max_scores.shape == (2, 4, 16)


def test_dense_registration_full_blocks_skip_mask_mod():
    query, key, value = qkv()
    out, _, _ = inductor_flex_attention(query, key, value, identity,
                                        partial_block_mask(16, 24, causal, with_full=True), 0.5, {})
    expected, _ = naive_attention(query, key, value, identity, keep_all, 0.5)
    torch.testing.assert_close(out, expected.float(), atol=1e-5, rtol=1e-5)


def test_dense_backward_registration_matches_autograd_of_reference():
    query, key, value = qkv(dtype=torch.float64)
    out, lse, _ = inductor_flex_attention(query, key, value, identity,
                                          partial_block_mask(16, 24, causal), 0.5, OPTIONS)
    grad_out = torch.randn_like(out)
    grads = inductor_flex_attention_backward(query, key, value, out, lse, grad_out, None, identity,
                                             build_joint_graph(identity, query, (), []),
                                             partial_block_mask(16, 24, causal), 0.5, OPTIONS, (), ())
    leaves = [t.detach().requires_grad_() for t in (query, key, value)]
    expected_out, _ = naive_attention(*leaves, identity, causal, 0.5)
    expected = torch.autograd.grad(expected_out, leaves, grad_out)
    for got, want in zip(grads[:3], expected):
        torch.testing.assert_close(got, want)
    assert grads[3] == ()


def test_autocast_casts_inputs_like_sdpa():
    query, key, value = qkv()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, lse, _ = inductor_flex_attention(query, key, value, identity,
                                              partial_block_mask(16, 24, causal), 0.5, OPTIONS)
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32
    expected, _ = inductor_flex_attention(query.bfloat16(), key.bfloat16(), value.bfloat16(),
                                          identity, partial_block_mask(16, 24, causal), 0.5,
                                          OPTIONS)[:2]
    torch.testing.assert_close(out, expected)


# ---------------------------------------------------------------------------------------
# extern fallback: mods as source
# ---------------------------------------------------------------------------------------

def test_mod_source_round_trip_lifts_constants():
    from inductor_flex.lowering.extern import mod_from_source, mod_to_source

    table = torch.arange(8.0)

    def score_mod(score, b, h, q_idx, kv_idx):
        return torch.where(q_idx >= kv_idx, score * table[kv_idx], -float("inf"))

    from inductor_flex._indexing import index_with_tensors
    from inductor_flex.ops._shared import mod_example_args

    with index_with_tensors():
        graph = make_fx(score_mod)(*mod_example_args(torch.zeros(1)))
    source, constants = mod_to_source(graph)
    assert len(constants) == 1 and constants[0] is table
    assert "_tensor_constant" not in source
    mod = mod_from_source(source)
    assert mod_from_source(source) is mod  # compiled once per text
    args = [torch.tensor(1.5), *(torch.tensor(i, dtype=torch.int32) for i in (0, 1, 5, 3))]
    torch.testing.assert_close(mod(*args, table), score_mod(*args))
    args[4] = torch.tensor(6, dtype=torch.int32)
    assert mod(*args, table).item() == -math.inf


def test_mod_source_rejects_unnameable_globals():
    from inductor_flex.lowering.extern import mod_to_source

    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    graph.output(graph.call_function(lambda t: t + 1, (x,)))
    with pytest.raises(RuntimeError, match="cannot be named from source code"):
        mod_to_source(torch.fx.GraphModule({}, graph))
