"""The GPU-oriented block-mask builders, checked on the CPU (tests/gpu/test_block_mask_gpu.py
runs them on CUDA):

* create_block_mask's compiled builder (one torch.compile'd whole-grid evaluation per
  mask_mod code), forced onto the CPU by widening ``_FUSED_DEVICE_TYPES``: equal to the
  brute-force reference, compiled once per mask_mod code whatever tensors a closure
  captures, never nested inside an outer compile, and replaced by the eager slabs when it
  cannot serve;
* create_document_block_mask's sync-free form (whole-row gathers, ``total_length``): the
  same lists, traceable with fullgraph=True (no host reads), and a new layout of the same
  length does not recompile the attention that uses it.
"""
import pytest
import torch
import torch._dynamo
import torch._dynamo.testing

import inductor_flex
import inductor_flex.block_mask as block_mask_module
import inductor_flex.masks._packed_blocks as document_module
from inductor_flex._block_lists import dense_to_listed, dense_to_listed_by_search
from inductor_flex.block_mask import BlockMask, create_block_mask, create_mask
from inductor_flex.masks import create_document_block_mask

from test_block_mask import assert_layout, brute_blocks, document_truth, random_lengths

CPU = torch.device("cpu")


@pytest.fixture
def fused_on_cpu(monkeypatch):
    """The compiled builder serving CPU masks of any size, with a frame-counting backend
    (aot_eager: the traced graph's semantics without CPU code generation, which takes
    seconds per compile here) and an empty cache of builders."""
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    monkeypatch.setattr(block_mask_module, "_FUSED_DEVICE_TYPES", ("cpu",))
    monkeypatch.setattr(block_mask_module, "_FUSED_MIN_PAIRS", 0)
    monkeypatch.setattr(block_mask_module, "_FUSED_BY_DEFAULT", True)
    monkeypatch.setattr(block_mask_module, "_FUSED_BACKEND", counter)
    monkeypatch.setattr(block_mask_module, "_fused_builders", type(block_mask_module._fused_builders)())
    torch._dynamo.reset()
    yield counter
    torch._dynamo.reset()


def causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def window_by_head(b, h, q_idx, kv_idx):
    return (q_idx - kv_idx).abs() <= 9 + 7 * h


def batch_prefix(b, h, q_idx, kv_idx):
    return (kv_idx < 20 + 31 * b) | (q_idx >= kv_idx)


_POSITION_DOCUMENT = torch.arange(700) // 53


def same_document(b, h, q_idx, kv_idx):
    return _POSITION_DOCUMENT[q_idx] == _POSITION_DOCUMENT[kv_idx]


def assert_brute_force_layout(block_mask, mask_mod, B, H, q_len, kv_len, q_block, kv_block):
    dense = create_mask(mask_mod, B, H, q_len, kv_len, device=CPU)
    partial, full = brute_blocks(dense.expand(B or 1, H or 1, q_len, kv_len), q_block, kv_block)
    assert_layout(block_mask, partial, full)


# Odd lengths and block sizes, broadcast and real batch / head dims, masks that read b, h,
# neither, or a captured tensor (which the builder must not read past its end).
_BUILDER_CASES = [
    (causal, None, None, 256, 256, (128, 128)),
    (causal, 2, 3, 300, 171, (64, 32)),
    (window_by_head, None, 3, 129, 300, (16, 128)),
    (batch_prefix, 2, None, 97, 250, (32, 48)),
    (same_document, None, None, 700, 699, (128, 64)),
    (same_document, 1, 2, 1, 5, (16, 16)),
]


@pytest.mark.parametrize("mask_mod, B, H, q_len, kv_len, block_size", _BUILDER_CASES)
def test_compiled_builder_equals_brute_force(fused_on_cpu, mask_mod, B, H, q_len, kv_len, block_size):
    block_mask = create_block_mask(mask_mod, B, H, q_len, kv_len, device=CPU, BLOCK_SIZE=block_size)
    assert fused_on_cpu.frame_count >= 1  # the compiled builder served
    assert block_mask_module._fused_builders[mask_mod.__code__] is not None
    assert_brute_force_layout(block_mask, mask_mod, B, H, q_len, kv_len, *block_size)


def test_compiled_builder_without_full_blocks(fused_on_cpu):
    block_mask = create_block_mask(causal, None, None, 200, 130, device=CPU, BLOCK_SIZE=32,
                                   separate_full_blocks=False)
    assert block_mask.full_kv_indices is None and block_mask.full_q_num_blocks is None
    partial, full = brute_blocks(create_mask(causal, 1, 1, 200, 130, device=CPU), 32, 32)
    listed = BlockMask.from_kv_blocks(block_mask.kv_num_blocks, block_mask.kv_indices, BLOCK_SIZE=32,
                                      seq_lengths=(200, 130))
    assert torch.equal(listed.to_dense().bool(), partial | full)
    assert torch.equal(block_mask.q_indices, listed.q_indices)


def test_compiled_builder_by_inductor_equals_eager_slabs(monkeypatch):
    """One compile through Inductor's CPU code generation (the real backend), ragged blocks."""
    monkeypatch.setattr(block_mask_module, "_FUSED_DEVICE_TYPES", ("cpu",))
    monkeypatch.setattr(block_mask_module, "_fused_builders", type(block_mask_module._fused_builders)())
    torch._dynamo.reset()
    fused = create_block_mask(same_document, None, 2, 333, 290, device=CPU, BLOCK_SIZE=(64, 32), _compile=True)
    assert block_mask_module._fused_builders[same_document.__code__] is not None
    monkeypatch.setattr(block_mask_module, "_FUSED_DEVICE_TYPES", ())
    eager = create_block_mask(same_document, None, 2, 333, 290, device=CPU, BLOCK_SIZE=(64, 32))
    for field in BlockMask._BLOCK_LIST_FIELDS:
        assert torch.equal(getattr(fused, field), getattr(eager, field)), field
    torch._dynamo.reset()


def test_new_captured_tensors_and_lengths_do_not_recompile_for_ever(fused_on_cpu):
    """A closure over new document ids (the next batch) reuses the compiled builder; new
    lengths compile once more (then symbolic), not once per length."""

    def document_mask_of(ids):
        def per_batch_document(b, h, q_idx, kv_idx):
            return (ids[q_idx] == ids[kv_idx]) & (q_idx >= kv_idx)
        return per_batch_document

    gen = torch.Generator().manual_seed(3)
    for step in range(4):
        ids = torch.randint(0, 4, (300,), generator=gen).sort().values
        mask_mod = document_mask_of(ids)
        block_mask = create_block_mask(mask_mod, None, None, 300, 300, device=CPU, BLOCK_SIZE=64)
        assert_brute_force_layout(block_mask, mask_mod, None, None, 300, 300, 64, 64)
    assert fused_on_cpu.frame_count == 1
    for length in (200, 257, 130):
        mask_mod = document_mask_of(torch.arange(length) // 40)
        block_mask = create_block_mask(mask_mod, None, None, length, length, device=CPU, BLOCK_SIZE=64)
        assert_brute_force_layout(block_mask, mask_mod, None, None, length, length, 64, 64)
    assert fused_on_cpu.frame_count == 2


def test_inside_an_outer_compile_the_builder_is_traced_not_compiled(fused_on_cpu):
    @torch.compile(fullgraph=True, backend="aot_eager")
    def build():
        return create_block_mask(causal, None, None, 200, 200, device=CPU, BLOCK_SIZE=64, _compile=True).as_tuple()

    traced = build()
    assert fused_on_cpu.frame_count == 0 and not block_mask_module._fused_builders
    assert_layout(BlockMask.from_tuple(traced), *brute_blocks(create_mask(causal, 1, 1, 200, 200, device=CPU), 64, 64))


def test_builder_that_fails_to_compile_falls_back_to_eager_slabs(monkeypatch, caplog):
    def broken_backend(graph_module, example_inputs):
        raise RuntimeError("no code generation today")

    monkeypatch.setattr(block_mask_module, "_FUSED_DEVICE_TYPES", ("cpu",))
    monkeypatch.setattr(block_mask_module, "_FUSED_BACKEND", broken_backend)
    monkeypatch.setattr(block_mask_module, "_fused_builders", type(block_mask_module._fused_builders)())
    torch._dynamo.reset()
    with caplog.at_level("DEBUG", logger="inductor_flex"):
        block_mask = create_block_mask(window_by_head, None, 2, 150, 150, device=CPU, BLOCK_SIZE=32, _compile=True)
    assert "compiled builder failed" in caplog.text
    assert block_mask_module._fused_builders[window_by_head.__code__] is None  # not tried again
    assert_brute_force_layout(block_mask, window_by_head, None, 2, 150, 150, 32, 32)
    torch._dynamo.reset()


def test_symbolic_compile_failure_retries_with_static_lengths(monkeypatch, caplog):
    """A builder whose compile with symbolic lengths fails (issue 20: Inductor 2.11 on CUDA)
    is compiled again with static lengths, at once, and serves every later length: never
    the eager slabs for good."""
    compiles = []

    def no_symbolic_sizes(graph_module, example_inputs):
        symbolic = any(isinstance(x, torch.SymInt) for x in example_inputs)
        compiles.append(symbolic)
        if symbolic:
            raise RuntimeError("no code generation for symbolic sizes today")
        return graph_module.forward

    monkeypatch.setattr(block_mask_module, "_FUSED_DEVICE_TYPES", ("cpu",))
    monkeypatch.setattr(block_mask_module, "_FUSED_BACKEND", no_symbolic_sizes)
    monkeypatch.setattr(block_mask_module, "_fused_builders", type(block_mask_module._fused_builders)())
    torch._dynamo.reset()
    with caplog.at_level("DEBUG", logger="inductor_flex"):
        for length in (256, 384, 300):
            block_mask = create_block_mask(causal, None, None, length, length - 40, device=CPU, BLOCK_SIZE=64,
                                           _compile=True)
            assert_brute_force_layout(block_mask, causal, None, None, length, length - 40, 64, 64)
            builder = block_mask_module._fused_builders[causal.__code__]
            assert builder is not None
    assert builder._static_lengths
    assert compiles == [False, True, False, False], compiles  # the symbolic compile failed once
    assert "again with static lengths" in caplog.text and "eager slabs" not in caplog.text
    torch._dynamo.reset()


def test_searched_listing_equals_the_linear_partition():
    """dense_to_listed_by_search (compiled builders) lists what dense_to_listed does: every
    True column in increasing order, then every False one, also on empty and full rows."""
    gen = torch.Generator().manual_seed(5)
    dense = torch.rand(2, 3, 7, 19, generator=gen) < 0.4
    dense[0, 0, 0] = False
    dense[0, 0, 1] = True
    for matrix in (dense, dense.transpose(-2, -1), torch.zeros(1, 1, 3, 0, dtype=torch.bool)):
        expected, got = dense_to_listed(matrix), dense_to_listed_by_search(matrix)
        for e, g in zip(expected, got):
            assert g.dtype == torch.int32 and torch.equal(g, e)


def test_recompile_limit_renews_the_builder(fused_on_cpu):
    with torch._dynamo.config.patch(recompile_limit=1):
        create_block_mask(causal, None, None, 128, 128, device=CPU, BLOCK_SIZE=64)
        first_builder = block_mask_module._fused_builders[causal.__code__]
        # Another block size is a second variant: over the limit of one.
        block_mask = create_block_mask(causal, None, None, 128, 128, device=CPU, BLOCK_SIZE=32)
    assert_brute_force_layout(block_mask, causal, None, None, 128, 128, 32, 32)
    renewed = block_mask_module._fused_builders[causal.__code__]
    assert renewed is not None and renewed is not first_builder


def test_eager_stance_skips_the_builder(fused_on_cpu):
    with torch.compiler.set_stance("force_eager"):
        block_mask = create_block_mask(causal, None, None, 128, 128, device=CPU, BLOCK_SIZE=32)
    assert fused_on_cpu.frame_count == 0 and not block_mask_module._fused_builders
    assert_brute_force_layout(block_mask, causal, None, None, 128, 128, 32, 32)


def test_builder_is_used_on_cpu_only_when_told(monkeypatch):
    """Untouched settings: CPU masks never compile (the slabs are faster there), even with
    _compile=True."""
    monkeypatch.setattr(block_mask_module, "_fused_builders", type(block_mask_module._fused_builders)())
    create_block_mask(causal, None, None, 128, 128, device=CPU, _compile=True)
    assert not block_mask_module._fused_builders
    assert not block_mask_module._fused_build_wanted(CPU, 1 << 40, True)
    cuda = torch.device("cuda")
    # Large CUDA grids compile by default only once the builder is GPU-proven (issue #20).
    assert block_mask_module._fused_build_wanted(cuda, 1 << 40, False) == block_mask_module._FUSED_BY_DEFAULT
    monkeypatch.setattr(block_mask_module, "_FUSED_BY_DEFAULT", True)
    assert block_mask_module._fused_build_wanted(cuda, 1 << 40, False)
    assert not block_mask_module._fused_build_wanted(cuda, block_mask_module._FUSED_MIN_PAIRS, False)
    assert block_mask_module._fused_build_wanted(cuda, 1, True)


# --------------------------------------------------------------------------------------
# Document masks without host synchronisation
# --------------------------------------------------------------------------------------


def assert_same_lists(expected: BlockMask, got: BlockMask):
    """Same counts and listed entries; unlisted slots need only be valid indices."""
    for count_field, index_field in (("kv_num_blocks", "kv_indices"), ("full_kv_num_blocks", "full_kv_indices"),
                                     ("q_num_blocks", "q_indices"), ("full_q_num_blocks", "full_q_indices")):
        counts, indices = getattr(expected, count_field), getattr(expected, index_field)
        if counts is None:
            assert getattr(got, count_field) is None and getattr(got, index_field) is None
            continue
        assert torch.equal(getattr(got, count_field), counts), count_field
        got_indices = getattr(got, index_field)
        listed = torch.arange(indices.shape[-1]) < counts[..., None]
        assert got_indices.shape == indices.shape
        assert torch.equal(got_indices[listed], indices[listed]), index_field
        assert int(got_indices.min()) >= 0 and int(got_indices.max()) < indices.shape[-1]


def _document_cases():
    gen = torch.Generator().manual_seed(11)
    cases = []
    for trial in range(16):
        total = int(torch.randint(1, 600, (1,), generator=gen))
        lengths = random_lengths(total, gen, [3, 40, 200, 600][trial % 4])
        block_size = [128, (64, 32), (16, 128), (48, 80)][trial % 4]
        cases.append((lengths, block_size, trial % 2 == 0, (trial // 2) % 4 == 1))
    return cases


@pytest.mark.parametrize("lengths, block_size, causal_flag, inner", _document_cases())
def test_document_whole_row_lists_equal_the_prefix_lists(monkeypatch, lengths, block_size, causal_flag, inner):
    inner_mod = (lambda b, h, q, kv: (q - kv).abs() <= 5) if inner else None
    host = create_document_block_mask(lengths=lengths, causal=causal_flag, mask_mod=inner_mod,
                                      BLOCK_SIZE=block_size, device=CPU)
    monkeypatch.setattr(document_module, "_writes_whole_rows", lambda device: True)
    whole_rows = create_document_block_mask(lengths=torch.tensor(lengths), causal=causal_flag, mask_mod=inner_mod,
                                            BLOCK_SIZE=block_size, device=CPU, total_length=sum(lengths))
    assert_same_lists(host, whole_rows)
    if not inner:
        total = sum(lengths)
        q_block, kv_block = (block_size, block_size) if isinstance(block_size, int) else block_size
        assert_layout(whole_rows, *brute_blocks(document_truth(lengths, causal_flag)[None, None], q_block, kv_block))


def test_document_mask_traces_without_host_reads():
    """fullgraph=True fails on any read of a tensor's value (item, tolist, nonzero, a sized
    repeat_interleave...): the traced construction is sync-free."""
    torch._dynamo.reset()

    @torch.compile(fullgraph=True, backend="aot_eager")
    def build(offsets):
        return create_document_block_mask(offsets=offsets, BLOCK_SIZE=(32, 64), device=CPU,
                                          total_length=300).as_tuple()[2:10]

    for cuts in ([0, 5, 5, 140, 141, 300], [0, 300], [0, 64, 128, 191, 300]):
        traced = BlockMask((300, 300), *build(torch.tensor(cuts)), BLOCK_SIZE=(32, 64))
        assert_same_lists(create_document_block_mask(offsets=cuts, BLOCK_SIZE=(32, 64), device=CPU), traced)
    torch._dynamo.reset()


@pytest.mark.parametrize("kwargs, message", [
    (dict(lengths=[3, 4], total_length=8), r"same number of tokens \(total_length=8\)"),
    (dict(lengths=[3, 4], total_length=0), "total_length must be a positive int"),
    (dict(lengths=[3, 4], total_length=7.0), "total_length must be a positive int"),
])
def test_document_total_length_checked_against_host_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        create_document_block_mask(device=CPU, **kwargs)


def test_new_document_layout_of_the_same_length_does_not_recompile_attention():
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounterWithBackend("inductor")
    attention = torch.compile(inductor_flex.flex_attention, backend=counter)
    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 2, 256, 16, generator=gen) for _ in range(3))
    layouts = ([100, 156], [1, 2, 3, 250], [256], [64] * 4, [17, 0, 200, 39])
    for lengths in layouts:
        for inner in (None, lambda b, h, q_idx, kv_idx: q_idx - kv_idx < 50):
            block_mask = create_document_block_mask(lengths=lengths, mask_mod=inner, BLOCK_SIZE=64, device=CPU)
            truth = create_mask(block_mask.mask_mod, 1, 1, 256, 256, device=CPU)
            out = attention(q, k, v, block_mask=block_mask)
            scores = (q @ k.transpose(-1, -2) / 4).masked_fill(~truth, float("-inf"))
            torch.testing.assert_close(out, torch.softmax(scores, -1) @ v, atol=1e-5, rtol=1e-5)
    # One graph with full blocks, one without (the inner mod's): not one per layout.
    assert counter.frame_count == 2
    torch._dynamo.reset()
