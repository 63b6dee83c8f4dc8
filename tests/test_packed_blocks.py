"""The one packed-document block-list builder (inductor_flex/masks/_packed_blocks.py) on
random packings: empty documents on either side, more queries than keys, used keys,
windows, uneven block sizes. Lists against the brute-force block truth; the whole-row form
(devices, tracing) against the CPU prefix form; traceable without host reads."""
import random

import pytest
import torch

import inductor_flex.masks._packed_blocks as packed_blocks
from inductor_flex.masks._packed_blocks import cu_seq_block_lists

from test_varlen import block_truth, dense_blocks
from varlen_reference import cu_seq, window_keep


def _random_case(seed):
    rng = random.Random(seed)
    docs = rng.randint(1, 5)
    lq = [rng.choice([0, 1, rng.randint(0, 50)]) for _ in range(docs)]
    lk = lq if seed % 3 == 0 else [rng.choice([0, 2, rng.randint(0, 50)]) for _ in range(docs)]
    lq[rng.randrange(docs)] += 1
    lk[rng.randrange(docs)] += 1
    used = [rng.randint(0, k) for k in lk] if seed % 4 == 1 else None
    window = (rng.choice([-1, 0, 3, 11]), rng.choice([-1, 0, 4]))
    block_size = (rng.choice([1, 4, 8, 16]), rng.choice([2, 4, 32]))
    return lq, lk, used, window, block_size


@pytest.mark.parametrize("seed", range(40))
def test_random_packings_against_brute_force(seed):
    lq, lk, used, window, block_size = _random_case(seed)
    cu_q, cu_k = cu_seq(lq), cu_seq(lk)
    used_k = None if used is None else torch.tensor(used, dtype=torch.int32)
    keep = torch.zeros(sum(lq), sum(lk), dtype=torch.bool)
    for d in range(len(lq)):
        keep[cu_q[d]:cu_q[d + 1], cu_k[d]:cu_k[d + 1]] = window_keep(lq[d], lk[d], window, "cpu",
                                                                   None if used is None else used[d])
    lists = cu_seq_block_lists(cu_q, cu_k, sum(lq), sum(lk), window, used_k, block_size)
    for (num, idx, full_num, full_idx), relation, (rb, cb) in (
            (lists[:4], keep, block_size), (lists[4:], keep.T, block_size[::-1])):
        n_col_blocks = idx.shape[-1]
        assert int(idx.min()) >= 0 and int(idx.max()) < n_col_blocks
        assert int(full_idx.min()) >= 0 and int(full_idx.max()) < n_col_blocks
        partial, full = dense_blocks(num, idx, n_col_blocks), dense_blocks(full_num, full_idx, n_col_blocks)
        any_visible, all_visible = block_truth(relation, rb, cb)
        assert torch.equal(full, all_visible & any_visible)
        assert not (partial & full).any()
        assert torch.equal((partial | full) & any_visible, any_visible)
        for r in range(num.shape[-1]):
            row = torch.cat([idx[0, 0, r, :num[0, 0, r]], full_idx[0, 0, r, :full_num[0, 0, r]]]).sort().values
            assert torch.all(row[1:] > row[:-1])


@pytest.mark.parametrize("seed", range(0, 40, 3))
def test_whole_rows_equal_prefix_rows(monkeypatch, seed):
    lq, lk, used, window, block_size = _random_case(seed)
    args = (cu_seq(lq), cu_seq(lk), sum(lq), sum(lk), window,
            None if used is None else torch.tensor(used, dtype=torch.int32), block_size)
    prefix = cu_seq_block_lists(*args)
    monkeypatch.setattr(packed_blocks, "_writes_whole_rows", lambda offsets: True)
    whole = cu_seq_block_lists(*args)
    for i in range(0, 8, 2):
        assert torch.equal(prefix[i], whole[i])
        listed = torch.arange(prefix[i + 1].shape[-1]) < prefix[i][..., None]
        assert torch.equal(prefix[i + 1][listed], whole[i + 1][listed])
        assert int(whole[i + 1].min()) >= 0 and int(whole[i + 1].max()) < prefix[i + 1].shape[-1]


def test_traces_without_host_reads():
    torch._dynamo.reset()

    @torch.compile(fullgraph=True, backend="aot_eager")
    def build(cu_q, cu_k, used):
        return cu_seq_block_lists(cu_q, cu_k, 60, 70, (5, 0), used, (8, 16))

    for lq, lk in (([20, 0, 40], [30, 25, 15]), ([1, 58, 1], [70, 0, 0])):
        used = torch.tensor([min(k, 9) for k in lk], dtype=torch.int32)
        expected = cu_seq_block_lists(cu_seq(lq), cu_seq(lk), 60, 70, (5, 0), used, (8, 16))
        got = build(cu_seq(lq), cu_seq(lk), used)
        for i in range(0, 8, 2):
            assert torch.equal(expected[i], got[i])
            listed = torch.arange(got[i + 1].shape[-1]) < expected[i][..., None]
            assert torch.equal(expected[i + 1][listed], got[i + 1][listed])
    torch._dynamo.reset()


def test_trusted_offsets_that_end_early_stay_in_range():
    # With total_length= the offsets are trusted, never read back; ones ending before the
    # total must not make the builder index past them (an illegal address on a GPU).
    layout = packed_blocks.packed_layout(torch.tensor([0, 3, 5]), 8)
    assert layout.doc.tolist() == [0, 0, 0, 1, 1, 1, 1, 1]
    assert layout.start.tolist() == [0, 0, 0, 3, 3, 3, 3, 3]
    assert layout.end.tolist() == [3, 3, 3, 5, 5, 5, 5, 5]


@pytest.mark.parametrize("seed", range(40))
def test_left_partial_runs_stay_within_the_static_bound(monkeypatch, seed):
    """The eager lists patch only the first ``max_left`` slots of each row (the bound
    comes from the block sizes and the window alone): every row's left run fits."""
    seen = []
    run_rows = packed_blocks._run_rows

    def recording(base, width, n_cols, fix_start=None, fix_count=None, max_fix=0):
        if fix_count is not None:
            seen.append((int(fix_count.max()) if fix_count.numel() else 0, max_fix))
        return run_rows(base, width, n_cols, fix_start, fix_count, max_fix)

    monkeypatch.setattr(packed_blocks, "_run_rows", recording)
    lq, lk, used, window, block_size = _random_case(seed)
    cu_seq_block_lists(cu_seq(lq), cu_seq(lk), sum(lq), sum(lk), window,
                       None if used is None else torch.tensor(used, dtype=torch.int32), block_size)
    assert all(longest <= bound for longest, bound in seen), seen
