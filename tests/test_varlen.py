"""varlen_attn on the CPU (the dense path): numerics against a float64 per-sequence
reference, the block lists built from cu_seq, the custom ops (opcheck, what Dynamo,
AOTAutograd and Inductor see), mods with document-local indices, and bad input."""
import re

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.testing import (AotEagerAndRecordGraphs, CompileCounterWithBackend,
                                   EagerAndRecordGraphs)
from torch._inductor.utils import run_and_get_code
from torch.testing import FileCheck

from inductor_flex.masks._packed_blocks import cu_seq_block_lists
from inductor_flex.varlen import (AuxRequest, varlen_attn, varlen_attn_backward_op,
                                  varlen_attn_op)
from varlen_reference import (assert_error_ratio, cu_seq, mean_abs, packed, reference,
                              run_with_grads, flex_in_dtype, window_keep)

# The issue's [512, 77, 1000, 1, 300, 128], scaled down for the CPU; odd lengths and a
# one-token document kept. 563 tokens: five 128-blocks, full and partial ones.
LENGTHS = [128, 77, 250, 1, 75, 32]
HEADS, DIM = 4, 32


pytestmark = pytest.mark.usefixtures("fresh_dynamo")


def inputs(dtype, lengths=LENGTHS, heads=HEADS, kv_heads=None, kv_lengths=None, seed=0):
    kv_lengths = lengths if kv_lengths is None else kv_lengths
    q = packed(sum(lengths), heads, DIM, dtype, seed=seed)
    k = packed(sum(kv_lengths), kv_heads or heads, DIM, dtype, seed=seed + 1)
    v = packed(sum(kv_lengths), kv_heads or heads, DIM, dtype, seed=seed + 2)
    return q, k, v, cu_seq(lengths), cu_seq(kv_lengths)


def cotangent(like, seed=3):
    return torch.randn(like.shape, generator=torch.Generator().manual_seed(seed)).to(like.dtype)


# ---------------------------------------------------------------------------------------
# Numerics
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("window", [(-1, -1), (-1, 0)], ids=["full", "causal"])
def test_forward_and_grads_against_per_sequence_reference(dtype, window):
    q, k, v, cu_q, cu_k = inputs(dtype)
    grad_out = cotangent(q)
    longest = max(LENGTHS)

    def ours(q, k, v):
        return varlen_attn(q, k, v, cu_q, cu_k, longest, longest, window_size=window)

    def golden_fn(q, k, v):
        return reference(q, k, v, cu_q, cu_k, window=window)[0]

    def eager(q, k, v):
        return flex_in_dtype(q, k, v, cu_q, window=window)

    got = run_with_grads(ours, q, k, v, grad_out)
    golden = run_with_grads(golden_fn, q, k, v, grad_out, torch.float64)
    assert got["out"].shape == (sum(LENGTHS), HEADS, DIM) and got["out"].dtype == dtype
    assert_error_ratio(got, run_with_grads(eager, q, k, v, grad_out), golden, dtype)


@pytest.mark.parametrize("window", [(16, 0), (8, 4), (0, 20)])
def test_sliding_window(window):
    q, k, v, cu_q, cu_k = inputs(torch.bfloat16)
    grad_out = cotangent(q)
    got = run_with_grads(lambda *t: varlen_attn(*t, cu_q, cu_k, 250, 250, window_size=window),
                         q, k, v, grad_out)
    golden = run_with_grads(lambda *t: reference(*t, cu_q, cu_k, window=window)[0],
                            q, k, v, grad_out, torch.float64)
    yardstick = run_with_grads(lambda *t: flex_in_dtype(*t, cu_q, window=window),
                               q, k, v, grad_out)
    assert_error_ratio(got, yardstick, golden, torch.bfloat16)


def test_gqa():
    q, k, v, cu_q, cu_k = inputs(torch.float16, heads=8, kv_heads=2)
    grad_out = cotangent(q)
    got = run_with_grads(lambda *t: varlen_attn(*t, cu_q, cu_k, 250, 250, window_size=(-1, 0),
                                                enable_gqa=True), q, k, v, grad_out)
    golden = run_with_grads(lambda *t: reference(*t, cu_q, cu_k, window=(-1, 0))[0],
                            q, k, v, grad_out, torch.float64)
    yardstick = run_with_grads(lambda *t: flex_in_dtype(*t, cu_q, window=(-1, 0), enable_gqa=True),
                               q, k, v, grad_out)
    assert got["dk"].shape == k.shape and got["dv"].shape == v.shape
    assert_error_ratio(got, yardstick, golden, torch.float16)


def test_lse_value_shape_and_gradient():
    q, k, v, cu_q, cu_k = inputs(torch.float32)
    grad_out, grad_lse = cotangent(q), cotangent(torch.empty(HEADS, q.shape[0]), seed=4)

    def ours(q, k, v):
        return varlen_attn(q, k, v, cu_q, cu_k, 250, 250, window_size=(-1, 0),
                           return_aux=AuxRequest(lse=True))

    got = run_with_grads(ours, q, k, v, grad_out, grad_lse=grad_lse)
    golden = run_with_grads(lambda *t: reference(*t, cu_q, cu_k, window=(-1, 0)), q, k, v,
                            grad_out, torch.float64, grad_lse=grad_lse)
    assert got["lse"].shape == (HEADS, q.shape[0]) and got["lse"].dtype == torch.float32
    for name in ("out", "lse", "dq", "dk", "dv"):
        scale = golden[name].abs().mean().item()
        assert mean_abs(got[name], golden[name]) <= 1e-5 * scale, (name, mean_abs(got[name], golden[name]), scale)


def test_lse_only_loss_reaches_inputs():
    q, k, v, cu_q, cu_k = inputs(torch.float64, lengths=[5, 9, 1])
    q.requires_grad_()
    _, lse = varlen_attn(q, k, v, cu_q, cu_k, 9, 9, return_aux=AuxRequest(lse=True))
    (grad,) = torch.autograd.grad(lse.sum(), q)
    (expected,) = torch.autograd.grad(reference(q, k, v, cu_q, cu_k)[1].sum(), q)
    torch.testing.assert_close(grad, expected)


def test_different_query_and_key_lengths_bottom_right_causal():
    """Queries fewer or more than keys: causal aligns at the bottom right, rows seeing
    nothing give 0 and lse -inf, and no NaN reaches any gradient."""
    q, k, v, cu_q, cu_k = inputs(torch.float64, lengths=[3, 9, 1, 6], kv_lengths=[7, 4, 1, 0])
    grad_out = cotangent(q)

    def ours(q, k, v):
        return varlen_attn(q, k, v, cu_q, cu_k, 9, 7, window_size=(-1, 0),
                           return_aux=AuxRequest(lse=True))

    got = run_with_grads(ours, q, k, v, grad_out)
    golden = run_with_grads(lambda *t: reference(*t, cu_q, cu_k, window=(-1, 0)), q, k, v,
                            grad_out)
    empty_rows = torch.isneginf(golden["lse"])
    assert empty_rows.any()
    assert torch.equal(torch.isneginf(got["lse"]), empty_rows)
    assert torch.all(got["out"][empty_rows.any(0)] == 0)
    for name, value in got.items():
        assert not value.isnan().any(), name
        torch.testing.assert_close(value, golden[name].to(value.dtype), msg=name)


def test_seqused_k_forward_and_no_backward():
    q, k, v, cu_q, cu_k = inputs(torch.float64, lengths=[6, 9, 4])
    used = torch.tensor([2, 9, 0], dtype=torch.int32)
    out = varlen_attn(q, k, v, cu_q, cu_k, 9, 9, seqused_k=used, window_size=(-1, 0))
    torch.testing.assert_close(out, reference(q, k, v, cu_q, cu_k, window=(-1, 0), used_k=used)[0])
    with pytest.raises(RuntimeError, match="inference-only"):
        varlen_attn(q.requires_grad_(), k, v, cu_q, cu_k, 9, 9, seqused_k=used)


def test_cu_seq_k_none_means_cu_seq_q():
    q, k, v, cu_q, _ = inputs(torch.float64, lengths=[4, 7])
    torch.testing.assert_close(varlen_attn(q, k, v, cu_q, None, 7, 7),
                               varlen_attn(q, k, v, cu_q, cu_q, 7, 7))


# ---------------------------------------------------------------------------------------
# Mods with document-local indices
# ---------------------------------------------------------------------------------------
def test_score_mod_and_mask_mod_see_document_local_indices():
    q, k, v, cu_q, cu_k = inputs(torch.float64)
    bias = torch.randn(HEADS, 250, dtype=torch.float64, requires_grad=True)

    def relative_bias(score, b, h, q_idx, kv_idx):
        return score + bias[h, q_idx - kv_idx]

    def prefix_or_recent(b, h, q_idx, kv_idx):
        return (kv_idx < 4) | (q_idx - kv_idx < 32)

    def call(fn, *tensors):
        return fn(*tensors, cu_q, cu_k, 250, 250, window_size=(-1, 0),
                  return_aux=AuxRequest(lse=True), score_mod=relative_bias,
                  mask_mod=prefix_or_recent)

    def golden_fn(*tensors):
        return reference(*tensors, cu_q, cu_k, window=(-1, 0),
                         score_mod=lambda s, b, h, i, j: s + bias[h, (i - j).clamp(min=0)],
                         mask_mod=prefix_or_recent)

    out, lse = call(varlen_attn, q, k, v)
    want_out, want_lse = golden_fn(q, k, v)
    torch.testing.assert_close(out, want_out)
    torch.testing.assert_close(lse, want_lse.float())
    (got_grad,) = torch.autograd.grad(out.sum(), bias)
    (want_grad,) = torch.autograd.grad(want_out.sum(), bias)
    torch.testing.assert_close(got_grad, want_grad)


# ---------------------------------------------------------------------------------------
# Block lists from cu_seq
# ---------------------------------------------------------------------------------------
def dense_blocks(num_blocks, indices, n_cols):
    rows = torch.zeros(indices.shape[-2], n_cols, dtype=torch.bool)
    for r in range(rows.shape[0]):
        rows[r, indices[0, 0, r, :num_blocks[0, 0, r]].long()] = True
    return rows


def block_truth(keep, row_block, col_block):
    """(any visible, all visible) per block of an element mask [rows, cols]."""
    rows, cols = keep.shape
    n_r, n_c = -(-rows // row_block), -(-cols // col_block)
    any_ = torch.zeros(n_r, n_c, dtype=torch.bool)
    all_ = torch.zeros(n_r, n_c, dtype=torch.bool)
    for r in range(n_r):
        for c in range(n_c):
            tile = keep[r * row_block:(r + 1) * row_block, c * col_block:(c + 1) * col_block]
            any_[r, c], all_[r, c] = tile.any(), tile.all()
    return any_, all_


@pytest.mark.parametrize("lengths, kv_lengths, used", [
    ([13, 1, 30, 0, 7], None, None),
    ([5, 12, 3, 20], [9, 0, 8, 14], None),
    ([10, 17, 6], [12, 17, 9], [4, 17, 0]),
])
@pytest.mark.parametrize("window", [(-1, -1), (-1, 0), (5, 0), (3, 6), (0, -1)])
@pytest.mark.parametrize("block_size", [(4, 4), (8, 4), (4, 16)])
def test_block_lists_from_cu_seq(lengths, kv_lengths, used, window, block_size):
    """Full blocks are exactly those every pair of which is visible; every block with a
    visible pair is listed (full or partial); the q-side lists describe the same relation."""
    kv_lengths = lengths if kv_lengths is None else kv_lengths
    cu_q, cu_k = cu_seq(lengths), cu_seq(kv_lengths)
    used_k = None if used is None else torch.tensor(used, dtype=torch.int32)
    q_len, kv_len = sum(lengths), sum(kv_lengths)
    keep = torch.zeros(q_len, kv_len, dtype=torch.bool)
    for d, (qa, qb, ka, kb) in enumerate(zip(cu_q[:-1], cu_q[1:], cu_k[:-1], cu_k[1:])):
        keep[qa:qb, ka:kb] = window_keep(int(qb - qa), int(kb - ka), window, "cpu",
                                         None if used is None else used[d])
    lists = cu_seq_block_lists(cu_q, cu_k, q_len, kv_len, window, used_k, block_size)
    for (num, idx, full_num, full_idx), relation, (rb, cb), n_cols in (
            (lists[:4], keep, block_size, kv_len), (lists[4:], keep.T, block_size[::-1], q_len)):
        n_col_blocks = -(-n_cols // cb)
        assert num.dtype == idx.dtype == torch.int32
        assert idx.min() >= 0 and idx.max() < n_col_blocks
        partial = dense_blocks(num, idx, n_col_blocks)
        full = dense_blocks(full_num, full_idx, n_col_blocks)
        any_visible, all_visible = block_truth(relation, rb, cb)
        assert torch.equal(full, all_visible)
        assert not (partial & full).any()
        assert torch.equal((partial | full) & any_visible, any_visible)
        for r in range(num.shape[-1]):  # listed in increasing order
            row = idx[0, 0, r, :num[0, 0, r]]
            assert torch.all(row[1:] > row[:-1])


def test_block_lists_without_full_blocks():
    cu = cu_seq([9, 4, 11])
    num, idx, full_num, full_idx, *q_side = cu_seq_block_lists(cu, cu, 24, 24, (-1, 0),
                                                               block_size=(4, 4),
                                                               allow_full=False)
    assert full_num is None and full_idx is None and q_side[2] is None
    keep = torch.block_diag(*[window_keep(n, n, (-1, 0), "cpu") for n in (9, 4, 11)])
    any_visible, _ = block_truth(keep, 4, 4)
    assert torch.equal(dense_blocks(num, idx, 6) & any_visible, any_visible)


# ---------------------------------------------------------------------------------------
# A packed attention block against padded SDPA
# ---------------------------------------------------------------------------------------
class PackedSelfAttention(torch.nn.Module):
    def __init__(self, embed, heads):
        super().__init__()
        self.heads = heads
        self.qkv = torch.nn.Linear(embed, 3 * embed, dtype=torch.float64)
        self.proj = torch.nn.Linear(embed, embed, dtype=torch.float64)

    def split(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        return [t.unflatten(-1, (self.heads, -1)) for t in (q, k, v)]

    def forward(self, packed_x, cu, longest):
        q, k, v = self.split(packed_x)  # [T, H, D]
        out = varlen_attn(q, k, v, cu, cu, longest, longest, window_size=(-1, 0))
        return self.proj(out.flatten(-2))

    def forward_padded(self, padded_x, lengths):
        q, k, v = [t.transpose(1, 2) for t in self.split(padded_x)]  # [N, H, L, D]
        longest = padded_x.shape[1]
        positions = torch.arange(longest)
        valid = positions[None, :] < torch.tensor(lengths)[:, None]
        causal = positions[:, None] >= positions[None, :]
        mask = (causal[None] & valid[:, None, :])[:, None]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(out.transpose(1, 2).flatten(-2))


def test_module_matches_padded_sdpa_forward_and_backward():
    lengths = [17, 5, 1, 30]
    torch.manual_seed(0)
    module = PackedSelfAttention(embed=32, heads=4)
    tokens = [torch.randn(n, 32, dtype=torch.float64) for n in lengths]
    packed_x = torch.cat(tokens).requires_grad_()
    padded_x = torch.nn.utils.rnn.pad_sequence(tokens, batch_first=True).requires_grad_()

    packed_out = module(packed_x, cu_seq(lengths), max(lengths))
    padded_out = module.forward_padded(padded_x, lengths)
    valid = torch.cat([padded_out[i, :n] for i, n in enumerate(lengths)])
    torch.testing.assert_close(packed_out, valid)

    weight = torch.randn_like(packed_out)
    packed_grads = torch.autograd.grad((packed_out * weight).sum(), [packed_x, *module.parameters()])
    padded_weight = torch.nn.utils.rnn.pad_sequence(weight.split(lengths), batch_first=True)
    padded_grads = torch.autograd.grad((padded_out * padded_weight).sum(),
                                       [padded_x, *module.parameters()])
    torch.testing.assert_close(packed_grads[0], torch.cat(
        [padded_grads[0][i, :n] for i, n in enumerate(lengths)]))
    for got, want in zip(packed_grads[1:], padded_grads[1:]):
        torch.testing.assert_close(got, want)


# ---------------------------------------------------------------------------------------
# The custom ops
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("window", [(-1, 0), (3, 2)])
def test_opcheck(window):
    q, k, v, cu_q, cu_k = inputs(torch.float32, lengths=[5, 1, 9], heads=4, kv_heads=2)
    leaves = [t.requires_grad_() for t in (q, k, v)]
    args = (*leaves, cu_q, cu_k, 9, 9, 0.3, *window, None)
    torch.library.opcheck(varlen_attn_op, args)
    out, lse = varlen_attn_op(*args)
    for grad_lse in (None, cotangent(lse)):
        torch.library.opcheck(varlen_attn_backward_op, (
            cotangent(out), grad_lse, *[t.detach() for t in (q, k, v, out, lse)], cu_q, cu_k,
            9, 9, 0.3, *window))


def attention(q, k, v, cu_q, cu_k):
    return varlen_attn(q, k, v, cu_q, cu_k, 250, 250, window_size=(-1, 0))


def operator_targets(graph_module):
    return {str(node.target) for node in graph_module.graph.nodes if node.op == "call_function"
            and isinstance(node.target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket,
                                         torch._ops.HigherOrderOperator))}


def test_dynamo_and_aot_graphs_hold_exactly_our_custom_ops():
    q, k, v, cu_q, cu_k = inputs(torch.float32)
    eager_backend = EagerAndRecordGraphs()
    torch.compile(attention, backend=eager_backend, fullgraph=True)(q, k, v, cu_q, cu_k)
    (dynamo_graph,) = eager_backend.graphs
    assert operator_targets(dynamo_graph) == {"inductor_flex.varlen_attn.default"}

    torch._dynamo.reset()
    aot_backend = AotEagerAndRecordGraphs()
    leaves = [t.requires_grad_() for t in (q, k, v)]
    torch.compile(attention, backend=aot_backend, fullgraph=True)(*leaves, cu_q, cu_k).sum().backward()
    (forward,), (backward,) = aot_backend.fw_graphs, aot_backend.bw_graphs
    assert operator_targets(forward) - {"aten.detach.default"} == {"inductor_flex.varlen_attn.default"}
    assert operator_targets(backward) == {"inductor_flex.varlen_attn_backward.default"}


def test_inductor_lowers_to_our_flex_operators():
    """Inductor decomposes both custom ops into our flex operators (on the CPU they lower
    to the dense extern kernels), and the results match eager under the error-ratio rule.
    The offsets are data: other documents of the same count reuse the compiled code, whose
    block lists follow them (nothing was read on the host at compile time)."""
    dtype = torch.bfloat16
    q, k, v, cu_q, cu_k = inputs(dtype)
    grad_out = cotangent(q)
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(attention, backend=counter, fullgraph=True)

    def run_compiled(q, k, v):
        return compiled(q, k, v, cu_q, cu_k)

    got, codes = run_and_get_code(run_with_grads, run_compiled, q, k, v, grad_out)
    code = "\n".join(codes)
    FileCheck().check("torch.ops.inductor_flex.dense_forward.default(").run(code)
    FileCheck().check("torch.ops.inductor_flex.dense_backward.default(").run(code)
    # Kernel names may mention varlen_attn (the ops their code came from); calls may not.
    assert "torch.ops.inductor_flex.varlen_attn" not in code
    assert not re.search(r"\.item\(\)|\.tolist\(\)|\.cpu\(\)", code)
    eager = run_with_grads(lambda *t: attention(*t, cu_q, cu_k), q, k, v, grad_out)
    golden = run_with_grads(lambda *t: reference(*t, cu_q, cu_k, window=(-1, 0))[0],
                            q, k, v, grad_out, torch.float64)
    assert_error_ratio(got, eager, golden, dtype)

    cu_q = cu_seq([1, 250, 77, 128, 32, 75])
    cu_k = cu_q.clone()  # distinct tensors, as before: the same guards hold
    got = run_with_grads(run_compiled, q, k, v, grad_out)
    assert counter.frame_count == 1
    eager = run_with_grads(lambda *t: attention(*t, cu_q, cu_k), q, k, v, grad_out)
    golden = run_with_grads(lambda *t: reference(*t, cu_q, cu_k, window=(-1, 0))[0],
                            q, k, v, grad_out, torch.float64)
    assert_error_ratio(got, eager, golden, dtype)


# Batches of a loop: each new offsets, token count (so 128-blocks: 2, 2, 4, 2), document
# count and longest document. Every one has two or more documents and more than one block:
# a single document or block is a size-1 dimension, which PyTorch specialises (one more
# graph, once).
LOOP_BATCHES = [[100, 60], [60, 40, 156], [300, 12, 44, 100], [5, 70, 83, 3, 40]]


@pytest.mark.parametrize("passes", ["forward", "forward_backward"])
def test_loop_over_new_batches_stops_compiling_after_the_second(passes):
    """A loop over packed batches compiles twice (the first call's sizes, then a dynamic
    graph) and never again: nothing in the graph pins T, the number of documents, their
    offsets or max_q / max_k. Forward only (torch.no_grad(), an inference graph) and
    forward + backward; every batch matches eager under the error-ratio rule."""
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(varlen_attn, backend=counter, fullgraph=True)
    window = (-1, 0)
    for number, lengths in enumerate(LOOP_BATCHES):
        q, k, v, cu_q, cu_k = inputs(torch.float32, lengths=lengths, heads=2, seed=number)
        grad_out = cotangent(q)
        longest = max(lengths)

        def attend(fn):
            return lambda q, k, v: fn(q, k, v, cu_q, cu_k, longest, longest, window_size=window)

        def golden_fn(q, k, v):
            return reference(q, k, v, cu_q, cu_k, window=window)[0]

        if passes == "forward":
            with torch.no_grad():
                got = {"out": attend(compiled)(q, k, v)}
                eager = {"out": attend(varlen_attn)(q, k, v)}
                golden = {"out": golden_fn(q.double(), k.double(), v.double())}
        else:
            got = run_with_grads(attend(compiled), q, k, v, grad_out)
            eager = run_with_grads(attend(varlen_attn), q, k, v, grad_out)
            golden = run_with_grads(golden_fn, q, k, v, grad_out, torch.float64)
        assert counter.frame_count == min(number + 1, 2), f"batch {number}: {lengths}"
        assert_error_ratio(got, eager, golden, torch.float32)


# ---------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------
def good_args():
    q, k, v, cu_q, cu_k = inputs(torch.float32, lengths=[3, 5])
    return dict(query=q, key=k, value=v, cu_seq_q=cu_q, cu_seq_k=cu_k, max_q=5, max_k=5)


@pytest.mark.parametrize("change, error, message", [
    (dict(cu_seq_q=torch.tensor([0, 3, 8])), ValueError, "cu_seq_q must be a 1-D int32 tensor"),
    (dict(cu_seq_k=torch.tensor([0, 3, 8], dtype=torch.int32).reshape(1, 3)), ValueError,
     "cu_seq_k must be a 1-D int32"),
    (dict(cu_seq_q=torch.tensor([1, 3, 8], dtype=torch.int32)), ValueError, "must start at 0"),
    (dict(cu_seq_k=torch.tensor([0, 6, 5, 8], dtype=torch.int32)), ValueError,
     "cu_seq_q and cu_seq_k must both hold"),
    (dict(cu_seq_q=torch.tensor([0, 6, 5], dtype=torch.int32),
          cu_seq_k=torch.tensor([0, 6, 5], dtype=torch.int32)), ValueError, "non-decreasing"),
    (dict(cu_seq_q=torch.tensor([0, 3, 7], dtype=torch.int32)), ValueError,
     r"last entry of cu_seq_q \(7\) must equal the number of packed tokens \(8\)"),
    (dict(max_q=4), ValueError, r"max_q=4 is smaller than the longest sequence in cu_seq_q \(5\)"),
    (dict(max_k=2), ValueError, "max_k=2 is smaller"),
    (dict(key=torch.randn(8, 2, 32), value=torch.randn(8, 2, 32)), ValueError,
     "enable_gqa=True"),
    (dict(query=torch.randn(8, 4, 32)[..., :16]), ValueError, "same head dim"),
    (dict(query=torch.randn(1, 8, 4, 32)), ValueError, r"query must be a packed \[T, H, D\]"),
    (dict(window_size=(-2, 0)), ValueError, "window_size entries must be >= 0, or -1"),
    (dict(window_size=(1, 2, 3)), ValueError, "window_size must be a pair"),
    (dict(num_splits=0), ValueError, "num_splits"),
    (dict(score_mod=3), ValueError, "score_mod must be callable"),
])
def test_bad_input(change, error, message):
    args = {**good_args(), **change}
    with pytest.raises(error, match=message):
        varlen_attn(**args)


def test_gqa_heads_must_divide():
    args = good_args()
    args.update(key=torch.randn(8, 3, 32), value=torch.randn(8, 3, 32), enable_gqa=True)
    with pytest.raises(ValueError, match="multiple of the number of key/value heads"):
        varlen_attn(**args)


def test_static_checks_hold_under_compile():
    args = good_args()
    args["cu_seq_q"] = args["cu_seq_q"].long()
    # Dynamo re-raises it wrapped (fullgraph), with our message.
    with pytest.raises(Exception, match="cu_seq_q must be a 1-D int32 tensor"):
        torch.compile(lambda a: varlen_attn(**a), backend="eager", fullgraph=True)(args)
