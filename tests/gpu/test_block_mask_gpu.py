"""Block masks built on the GPU (issue 20): create_block_mask's compiled builder and the
sync-free create_document_block_mask, against the CPU constructions (themselves checked
against brute force in tests/test_block_mask.py and tests/test_block_mask_builders.py).

Checked: equal lists; the compiled builder served (not the eager slabs); no host
synchronisation (``torch.cuda.set_sync_debug_mode("error")`` turns any into an error);
extra memory O(blocks); no recompile for a closure over new tensors. Skips without CUDA.
"""
import contextlib
import pathlib
import sys

import pytest
import torch
import torch._dynamo.testing

import inductor_flex.block_mask as block_mask_module
from inductor_flex.block_mask import BlockMask, create_block_mask, create_mask
from inductor_flex.masks import create_document_block_mask

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # tests/, for the helpers
from test_block_mask_builders import assert_same_lists  # noqa: E402


@contextlib.contextmanager
def no_host_sync():
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(previous)


def on_cpu(block_mask: BlockMask) -> BlockMask:
    return block_mask.to("cpu")


def causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def window_by_head(b, h, q_idx, kv_idx):
    return (q_idx - kv_idx).abs() <= 300 + 200 * h


def batch_prefix(b, h, q_idx, kv_idx):
    return (kv_idx < 700 + 1000 * b) | (q_idx >= kv_idx)


def document_mask_of(ids):
    def same_document_causal(b, h, q_idx, kv_idx):
        return (ids[q_idx] == ids[kv_idx]) & (q_idx >= kv_idx)
    return same_document_causal


def random_document_ids(total, seed, device):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 9, (total,), generator=gen).sort().values.to(device=device, dtype=torch.int32)


# Sizes above _FUSED_MIN_PAIRS (the default path compiles), odd lengths and block sizes.
_DEFAULT_PATH_CASES = [
    ("causal", None, None, 4100, 4099, 128),
    ("causal", None, None, 8192, 8192, 128),
    ("window_by_head", None, 2, 4000, 5000, (128, 64)),
    ("batch_prefix", 2, None, 3001, 6007, (64, 128)),
    ("document", None, None, 5000, 5000, 128),
]


def mask_mod_named(name, device, total=None):
    if name == "document":
        return document_mask_of(random_document_ids(total, 0, device))
    return {"causal": causal, "window_by_head": window_by_head, "batch_prefix": batch_prefix}[name]


@pytest.mark.parametrize("name, B, H, q_len, kv_len, block_size", _DEFAULT_PATH_CASES)
def test_default_path_compiles_and_equals_cpu(monkeypatch, device, name, B, H, q_len, kv_len, block_size):
    monkeypatch.setattr(block_mask_module, "_FUSED_BY_DEFAULT", True)  # the path #20 will make default
    mask_mod = mask_mod_named(name, device, q_len)
    got = create_block_mask(mask_mod, B, H, q_len, kv_len, device=device, BLOCK_SIZE=block_size)
    assert block_mask_module._fused_builders.get(mask_mod.__code__) is not None, "eager slabs served"
    cpu_mod = mask_mod_named(name, "cpu", q_len) if name == "document" else mask_mod
    expected = create_block_mask(cpu_mod, B, H, q_len, kv_len, device="cpu", BLOCK_SIZE=block_size)
    assert_same_lists(expected, on_cpu(got))


@pytest.mark.parametrize("q_len, kv_len, B, H, block_size", [
    (300, 171, 2, 3, (64, 32)), (1, 129, None, None, 16), (1000, 1000, None, 4, 128)])
def test_compile_requested_for_small_masks_equals_cpu(device, q_len, kv_len, B, H, block_size):
    for mask_mod in (causal, window_by_head, batch_prefix):
        got = create_block_mask(mask_mod, B, H, q_len, kv_len, device=device, BLOCK_SIZE=block_size,
                                _compile=True)
        assert block_mask_module._fused_builders.get(mask_mod.__code__) is not None
        expected = create_block_mask(mask_mod, B, H, q_len, kv_len, device="cpu", BLOCK_SIZE=block_size)
        assert_same_lists(expected, on_cpu(got))


def test_compiled_builder_keeps_serving_across_lengths(device):
    """Issue 20: with _compile=True, causal at S=8192 compiled, then S=32768 (Dynamo's
    automatic dynamic shapes: lengths symbolic) failed in Inductor's scatter code generation
    and the builder fell back to eager slabs for good. Several lengths, the symbolic compile
    among them, must all be served by the builder with symbolic lengths (not the static
    fallback) and equal the CPU lists."""
    saved_builders = block_mask_module._fused_builders
    block_mask_module._fused_builders = type(saved_builders)()
    torch._dynamo.reset()
    try:
        for size in (8192, 32768, 20000, 16384):
            got = create_block_mask(causal, None, None, size, size, device=device, _compile=True)
            builder = block_mask_module._fused_builders.get(causal.__code__)
            assert builder is not None, f"S={size}: the compiled builder gave up (eager slabs from now on)"
            assert not builder._static_lengths, f"S={size}: the symbolic compile failed (static fallback)"
            expected = create_block_mask(causal, None, None, size, size, device="cpu")
            assert_same_lists(expected, on_cpu(got))
    finally:
        block_mask_module._fused_builders = saved_builders
        torch._dynamo.reset()


def test_compiled_builder_without_host_sync_and_without_recompiling(device):
    total = 8192
    counter = torch._dynamo.testing.CompileCounterWithBackend("inductor")
    saved_backend, saved_builders = block_mask_module._FUSED_BACKEND, block_mask_module._fused_builders
    block_mask_module._FUSED_BACKEND, block_mask_module._fused_builders = counter, type(saved_builders)()
    try:
        create_block_mask(document_mask_of(random_document_ids(total, 1, device)), None, None, total, total,
                          device=device, _compile=True)  # compiles
        for seed in (2, 3):
            ids = random_document_ids(total, seed, device)
            with no_host_sync():
                got = create_block_mask(document_mask_of(ids), None, None, total, total, device=device,
                                        _compile=True)
            expected = create_block_mask(document_mask_of(ids.cpu()), None, None, total, total, device="cpu")
            assert_same_lists(expected, on_cpu(got))
        assert counter.frame_count == 1
    finally:
        block_mask_module._FUSED_BACKEND, block_mask_module._fused_builders = saved_backend, saved_builders


def test_compiled_builder_memory_is_blocks_not_pairs(device):
    size = 32768  # 1 Gi pairs: a dense bool mask alone would be 1 GiB
    create_block_mask(causal, None, None, size, size, device=device)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    block_mask = create_block_mask(causal, None, None, size, size, device=device)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before
    assert extra < 32 * 2**20, f"{extra / 2**20:.1f} MiB extra for 256 x 256 blocks"
    assert int(block_mask.full_kv_num_blocks[0, 0, -1]) == 255 and int(block_mask.kv_num_blocks[0, 0, 7]) == 1


def test_inside_an_outer_compile_equals_cpu(device):
    @torch.compile(fullgraph=True)
    def build():
        return create_block_mask(window_by_head, None, 2, 3000, 2900, device=device, BLOCK_SIZE=(64, 128)).as_tuple()

    got = BlockMask.from_tuple(build())
    expected = create_block_mask(window_by_head, None, 2, 3000, 2900, device="cpu", BLOCK_SIZE=(64, 128))
    assert_same_lists(expected, on_cpu(got))


# --------------------------------------------------------------------------------------
# Document masks
# --------------------------------------------------------------------------------------


def random_lengths(total, seed, longest):
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, longest, (2 * total // max(1, longest // 2) + 2,), generator=gen)
    lengths = lengths[lengths.cumsum(0) < total]
    return torch.cat([lengths, torch.tensor([total - int(lengths.sum())])])


@pytest.mark.parametrize("total, longest, block_size, causal_flag, inner", [
    (5000, 700, 128, True, False), (4097, 64, (64, 128), False, False), (3000, 3000, (128, 32), True, True),
    (1, 1, 128, True, False)])
def test_document_mask_on_gpu_equals_cpu_without_host_sync(device, total, longest, block_size, causal_flag,
                                                           inner):
    lengths = random_lengths(total, total, longest)
    offsets = torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).to(device)
    inner_mod = (lambda b, h, q, kv: (q - kv).abs() <= 40) if inner else None
    expected = create_document_block_mask(lengths=lengths, causal=causal_flag, mask_mod=inner_mod,
                                          BLOCK_SIZE=block_size, device="cpu")
    create_document_block_mask(offsets=offsets, causal=causal_flag, BLOCK_SIZE=block_size, total_length=total)
    with no_host_sync():
        from_device = create_document_block_mask(offsets=offsets, causal=causal_flag, mask_mod=inner_mod,
                                                 BLOCK_SIZE=block_size, total_length=total)
        from_host = create_document_block_mask(lengths=lengths, causal=causal_flag, mask_mod=inner_mod,
                                               BLOCK_SIZE=block_size, device=device)
    for got in (from_device, from_host):
        assert got.kv_indices.device.type == "cuda"
        assert_same_lists(expected, on_cpu(got))
    # The element mask (the result's mask_mod) is the same on both devices.
    keep_gpu = create_mask(from_device.mask_mod, 1, 1, total, total, device=device)
    assert torch.equal(keep_gpu.cpu(), create_mask(expected.mask_mod, 1, 1, total, total, device="cpu"))


def test_document_mask_at_a_million_tokens_memory_and_lists(device):
    total = 1 << 20
    lengths = random_lengths(total, 7, 8192)
    offsets = torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).to(device)
    create_document_block_mask(offsets=offsets, total_length=total)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    with no_host_sync():
        got = create_document_block_mask(offsets=offsets, total_length=total)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before
    lists_bytes = sum(t.numel() * t.element_size() for t in got.as_tuple() if isinstance(t, torch.Tensor))
    # The four [8192, 8192] index lists (fixed by the block mask's shape) plus O(tokens).
    assert extra <= lists_bytes + 64 * 2**20, (extra, lists_bytes)
    assert_same_lists(create_document_block_mask(lengths=lengths, device="cpu"), on_cpu(got))
