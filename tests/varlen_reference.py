"""Shared by tests/test_varlen.py and tests/gpu/test_varlen_gpu.py: packed inputs, the
per-sequence float64 reference of varlen_attn, and the error-ratio check.

Errors are mean absolute differences from the float64 reference ("golden", computed on the
same inputs upcast). A result passes when its error is at most FACTOR[dtype] times the
error of a yardstick run in the same dtype (``flex_in_dtype``, or our eager path for
compiled runs) plus a floor of a few float32 ulps of the golden's size.
"""
import torch

FACTOR = {torch.float32: 10.0, torch.float16: 1.1, torch.bfloat16: 1.1}


def cu_seq(lengths, device="cpu"):
    offsets = [0]
    for length in lengths:
        offsets.append(offsets[-1] + length)
    return torch.tensor(offsets, dtype=torch.int32, device=device)


def packed(total, heads, dim, dtype, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(total, heads, dim, generator=gen).to(device=device, dtype=dtype)


def window_keep(q_len, kv_len, window, device, used=None):
    """bool [q_len, kv_len]: flash-attention's window around the bottom-right diagonal;
    with ``used``, only the first ``used`` keys exist (the diagonal ends at the last one)."""
    left, right = window
    i = torch.arange(q_len, device=device)[:, None]
    j = torch.arange(kv_len, device=device)[None, :]
    diagonal = i + (kv_len if used is None else used) - q_len
    keep = torch.ones(q_len, kv_len, dtype=torch.bool, device=device)
    if left >= 0:
        keep &= j >= diagonal - left
    if right >= 0:
        keep &= j <= diagonal + right
    if used is not None:
        keep &= j < used
    return keep


def reference(query, key, value, cu_q, cu_k, scale=None, window=(-1, -1), used_k=None,
              score_mod=None, mask_mod=None):
    """(out [Tq, Hq, Dv], lse [Hq, Tq]) sequence by sequence, differentiable; rows that
    see nothing give 0 and -inf. Mods get document-local indices (b = 0)."""
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    group = query.shape[1] // key.shape[1]
    outs, lses = [], []
    for d, (qa, qb, ka, kb) in enumerate(zip(cu_q[:-1].tolist(), cu_q[1:].tolist(),
                                              cu_k[:-1].tolist(), cu_k[1:].tolist())):
        q = query[qa:qb].transpose(0, 1)
        if kb == ka:  # no keys: nothing to see
            outs.append(query.new_zeros(qb - qa, query.shape[1], value.shape[-1]))
            lses.append(query.new_full((query.shape[1], qb - qa), float("-inf")))
            continue
        k = key[ka:kb].transpose(0, 1).repeat_interleave(group, 0)
        v = value[ka:kb].transpose(0, 1).repeat_interleave(group, 0)
        scores = (q @ k.transpose(-1, -2)) * scale
        heads = torch.arange(q.shape[0], device=q.device)[:, None, None]
        i = torch.arange(qb - qa, device=q.device)[None, :, None]
        j = torch.arange(kb - ka, device=q.device)[None, None, :]
        if score_mod is not None:
            scores = score_mod(scores, 0, heads, i, j)
        used = None if used_k is None else int(used_k[d])
        keep = window_keep(qb - qa, kb - ka, window, q.device, used)[None]
        if mask_mod is not None:
            keep = keep & mask_mod(0, heads, i, j)
        scores = scores.masked_fill(~keep, float("-inf"))
        row_max = scores.amax(-1, keepdim=True).detach()
        row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
        weights = torch.exp(scores - row_max)
        total = weights.sum(-1, keepdim=True)
        safe = total.clamp_min(torch.finfo(total.dtype).tiny)
        outs.append(((weights / safe) @ v).transpose(0, 1))
        lse = (torch.log(safe) + row_max).squeeze(-1)
        lses.append(torch.where(total.squeeze(-1) > 0, lse, torch.full_like(lse, float("-inf"))))
    return torch.cat(outs), torch.cat(lses, dim=1)


def flex_in_dtype(query, key, value, cu_q, window=(-1, -1), enable_gqa=False):
    """The same-dtype yardstick: ``flex_attention`` (eager) on the packed tensors as one
    batch entry, masked by ``generate_document_mask`` with the window inside each document
    (sequences with as many queries as keys). It rounds what our kernels round
    (docs/internals.md, "The dense reference"), so its error is what the error of a
    correct varlen path in that dtype should be; the float64 ``reference`` is independent
    of both."""
    from inductor_flex import create_block_mask, flex_attention
    from inductor_flex.masks import generate_document_mask

    left, right = window

    def in_window(b, h, q_idx, kv_idx):
        keep = q_idx >= 0  # all True
        if left >= 0:
            keep = keep & (kv_idx >= q_idx - left)
        if right >= 0:
            keep = keep & (kv_idx <= q_idx + right)
        return keep

    total = query.shape[0]
    mask = create_block_mask(generate_document_mask(in_window, offsets=cu_q),
                             None, None, total, total, device=query.device)
    out = flex_attention(*(t.unsqueeze(0).transpose(1, 2) for t in (query, key, value)),
                         block_mask=mask, enable_gqa=enable_gqa)
    return out.squeeze(0).transpose(0, 1)


def run_with_grads(fn, query, key, value, grad_out, dtype=None, grad_lse=None):
    """{out, lse?, dq, dk, dv} of ``fn(q, k, v) -> out or (out, lse)`` for fresh leaves
    (``dtype`` converts them, e.g. float64 for golden)."""
    leaves = [(t.to(dtype) if dtype else t).detach().requires_grad_() for t in (query, key, value)]
    result = fn(*leaves)
    out, lse = result if isinstance(result, tuple) else (result, None)
    outputs, seeds = [out], [grad_out.to(out.dtype)]
    if grad_lse is not None:
        finite = torch.isfinite(lse)
        outputs.append(torch.where(finite, lse, torch.zeros_like(lse)))
        seeds.append(torch.where(finite, grad_lse.to(lse.dtype), torch.zeros_like(lse)))
    grads = torch.autograd.grad(outputs, leaves, seeds)
    results = {"out": out.detach(), "dq": grads[0], "dk": grads[1], "dv": grads[2]}
    if lse is not None:
        results["lse"] = lse.detach()
    return results


def mean_abs(a, b):
    a, b = a.double(), b.double()
    finite = torch.isfinite(b)
    assert torch.equal(torch.isneginf(a), torch.isneginf(b)), "-inf entries differ"
    return (a[finite] - b[finite]).abs().mean().item() if finite.any() else 0.0


def assert_error_ratio(got, yardstick, golden, dtype, names=None):
    """Every entry of ``got`` (a dict of ``run_with_grads``) within FACTOR x the yardstick's
    error of golden, plus a floor; shapes and dtypes as the yardstick's, no NaN."""
    for name in names or got:
        value, reference = got[name], yardstick[name]
        assert value.shape == reference.shape and value.dtype == reference.dtype, name
        assert not value.isnan().any(), f"NaN in {name}"
        floor = 2.0 ** -20 * golden[name][torch.isfinite(golden[name])].abs().mean().item()
        err, ref_err = mean_abs(value, golden[name]), mean_abs(reference, golden[name])
        assert err <= FACTOR[dtype] * ref_err + floor, (
            f"{name}: error {err:.3g} vs yardstick {ref_err:.3g} ({dtype})")


def paged_cache(key, value, cu_k, page_size, spare_pages=3, width_extra=1, share_first=False,
                seed=0):
    """(key_pages, value_pages [n_pages, page_size, H, D], block_table int32 [N, width],
    seqused_k int32 [N]) holding the packed ``key`` / ``value`` of each sequence in pages
    placed at random (spare pages and unused table entries hold noise), so that
    ``varlen_attn(..., key_pages, value_pages, ..., seqused_k=, block_table=)`` must equal
    ``varlen_attn`` on the packed tensors. With ``share_first``, every sequence's first
    page is the first sequence's: the callers give all sequences the same first keys."""
    gen = torch.Generator().manual_seed(seed)
    lengths = cu_k.diff().tolist()
    counts = [-(-length // page_size) for length in lengths]
    owned = sum(counts) - (len(counts) - 1 if share_first else 0)
    n_pages = owned + spare_pages
    order = torch.randperm(n_pages, generator=gen).tolist()
    width = max(counts) + width_extra
    key_pages, value_pages = (torch.randn((n_pages, page_size) + tuple(t.shape[1:]), generator=gen)
                              .to(device=t.device, dtype=t.dtype) for t in (key, value))
    table = torch.randint(-1, n_pages, (len(lengths), width), generator=gen, dtype=torch.int32)
    start, shared = 0, None
    for row, (length, count) in enumerate(zip(lengths, counts)):
        pages = [order.pop() for _ in range(count)]
        if share_first and shared is not None and count:
            order.append(pages[0])
            pages[0] = shared
        elif share_first and count:
            shared = pages[0]
        table[row, :count] = torch.tensor(pages, dtype=torch.int32)
        for logical, page in enumerate(pages):
            tokens = slice(start + logical * page_size, start + min(length, (logical + 1) * page_size))
            rows = tokens.stop - tokens.start
            key_pages[page, :rows] = key[tokens]
            value_pages[page, :rows] = value[tokens]
        start += length
    used = torch.tensor(lengths, dtype=torch.int32)
    return key_pages, value_pages, table.to(key.device), used.to(key.device)
