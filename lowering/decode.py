"""CUDA lowering of the forward operator for short queries (decoding): split-KV, GQA-packed.

The fused forward gives each (query tile, batch, query head) one program; with one query
token that is one busy row in a 64-128 row tile and B x Hq programs, too few to fill the
GPU, each reading its KV head again. This kernel (``templates/decode.py.jinja``)

- packs the query heads of one GQA group (x the Q_LEN query tokens) into the tile's rows,
  so each K/V tile is read once per KV head;
- splits each row's listed KV blocks over ``SPLITS`` programs (chosen here from the SM
  count, the batch and the head groups), each writing an unnormalised partial output with
  its running max and sum;
- merges the splits as Inductor IR (a max and two sums over the split dim), so the merge
  fuses with whatever reads the output, and lse / max_scores come from the same merge.

It runs the forward's online-softmax step (``attend_kv_blocks`` in common.py.jinja), so
score_mod, mask_mod, captured buffers, block sparsity and the numerics are the forward's.
It declines (``dispatch.Declined``) where it does not apply, and under autograd: a
training graph whose lse is read is saving it for the fused backward, which is left to the
fused forward's results.
"""
import sympy
import torch
from torch._inductor import ir
from torch._inductor.virtualized import V, ops

from inductor_flex._block_lists import OperatorBlockMask

from .common import (
    attention_problem,
    block_mask_input_generators,
    block_mask_kernel_inputs,
    cached_template,
    choose_kernel,
    inline_mods,
    known_true,
    listed_block_kinds,
    online_softmax_constants,
    output_used,
    realize_fixed,
    record_subgraph_symbols,
    shape_constants,
    static_int,
)
from .configs import (
    DECODE_MAX_Q_LEN,
    configs_summary,
    decode_heads_per_program,
    decode_rows,
    decode_splits,
    select_decode_config,
)
from .dispatch import Declined
from .options import FORWARD, PassOptions
from .subgraphs import MASK_MOD_PLACEHOLDERS, SCORE_MOD_PLACEHOLDERS, gathered_bytes_per_score

LN2 = 0.6931471805599453


def _decode_grid(batch, q_heads, q_len, head_dim, meta, *, cdiv):
    """One program per (KV split, batch, group of HEADS_PER_PROGRAM query heads)."""
    return (meta["SPLITS"], batch, cdiv(q_heads, meta["HEADS_PER_PROGRAM"]))


def decode_template():
    """The decode TritonTemplate."""
    return cached_template("inductor_flex_decode", _decode_grid, "decode.py.jinja")


def multiprocessor_count(device) -> int:
    """The GPU's SM count, as Inductor reads device properties."""
    from torch._inductor.runtime.hints import DeviceProperties

    return DeviceProperties.create(device).multi_processor_count


def _split_count(options, device, batch, head_groups, kv_len, sparse_kv_block) -> int:
    """SPLIT_KV when the user sets it, else ``configs.decode_splits`` for this launch."""
    key, requested = options.lookup("SPLIT_KV")
    if requested is not None:
        if isinstance(requested, bool) or not isinstance(requested, int) or requested <= 0:
            raise ValueError(f"kernel option {key} must be a positive int, got {requested!r}")
        return requested
    static_kv_len = static_int(kv_len)
    kv_blocks = None if static_kv_len is None else -(-static_kv_len // sparse_kv_block)
    programs = V.graph.sizevars.optimization_hint(batch) * head_groups
    return decode_splits(multiprocessor_count(device), programs, kv_blocks)


# Whether BACKEND="AUTO" may pick the decode kernel (a switch for comparisons: on since
# tests/gpu/test_decode_kernel.py passed in full on the H200, issue #18, and
# benchmarks/bench_decode.py measured it faster than the fused forward at every shape).
ENABLED = True


def _decline_when_not_decoding(options, problem) -> None:
    if options.backend() == "AUTO" and not ENABLED:
        raise Declined("switched off for BACKEND='AUTO' (lowering/decode.ENABLED); "
                       "BACKEND='TRITON_DECODE' forces it")
    # A training graph that reads lse is (as far as the lowering can tell) saving it for the
    # backward: AUTO leaves that call to the fused forward, whose tiles the fused backward
    # mirrors. A forced TRITON_DECODE serves it (its out and lse are the forward's contract).
    if options.backend() == "AUTO" and not V.graph.is_inference and output_used(1, True):
        raise Declined("autograd: this training graph saves lse for the backward, which the "
                       "fused forward serves")
    q_len = static_int(problem.q_len)
    if q_len is None:
        raise Declined("a query length that varies at run time: the packed rows are fixed "
                       "at compile time")
    if q_len > DECODE_MAX_Q_LEN:
        raise Declined(f"Q_LEN={q_len} is above {DECODE_MAX_Q_LEN}: the forward's query "
                       f"tiles are full")
    if q_len > problem.sparse_q_block:
        raise Declined(f"Q_LEN={q_len} spans several query blocks of the block mask "
                       f"(Q_BLOCK_SIZE={problem.sparse_q_block})")


def lower_decode(query, key, value, score_mod, block_mask, scale, kernel_options,
                 score_mod_other_buffers=(), mask_mod_other_buffers=()):
    """Lower the forward operator to the decode kernel and its IR merge (``Declined``
    where it does not apply). Returns ``(out, lse, max_scores)`` as the fused forward."""
    options = PassOptions(kernel_options, FORWARD)
    kernel_options = dict(kernel_options or {})
    mask = OperatorBlockMask(*block_mask)
    problem = attention_problem(query, key, value, (score_mod, mask.mask_mod),
                                mask.q_block_size, mask.kv_block_size, scale,
                                list(score_mod_other_buffers) + list(mask_mod_other_buffers))
    # The GQA group size, when the head counts are compile-time constants; with symbolic
    # heads (dynamic shapes) each program takes one head and the kernel finds its KV head.
    q_heads, kv_heads = static_int(problem.q_heads), static_int(problem.kv_heads)
    group = q_heads // kv_heads if q_heads and kv_heads else 1
    _decline_when_not_decoding(options, problem)
    dtype, scale, device = problem.dtype, problem.scale, query.get_device()
    batch, q_len, kv_len = problem.batch, static_int(problem.q_len), problem.kv_len
    qk_head_dim, v_head_dim = problem.qk_head_dim, problem.v_head_dim
    sparse_kv_block = problem.sparse_kv_block

    has_partial_blocks, has_full_blocks = listed_block_kinds(
        mask.kv_num_blocks, mask.full_kv_num_blocks, mask.full_kv_indices)
    mask_heads_broadcast = all(
        known_true(sympy.Eq(counts.get_size()[1], 1))
        for counts in (mask.kv_num_blocks, mask.full_kv_num_blocks if has_full_blocks else None)
        if counts is not None)
    heads_per_program = decode_heads_per_program(group, q_len, mask_heads_broadcast)
    rows = decode_rows(heads_per_program, q_len)
    gathered = (gathered_bytes_per_score(score_mod, SCORE_MOD_PLACEHOLDERS, score_mod_other_buffers)
                + gathered_bytes_per_score(mask.mask_mod, MASK_MOD_PLACEHOLDERS, mask_mod_other_buffers))
    config = select_decode_config(problem.capability, dtype, qk_head_dim, v_head_dim, rows,
                                  sparse_kv_block, kernel_options, gathered)
    if config is None:
        raise Declined(f"block mask KV_BLOCK_SIZE={sparse_kv_block}: no tl.dot key tile of "
                       f"16 or more divides it")
    head_groups = V.graph.sizevars.optimization_hint(problem.q_heads) // heads_per_program
    splits = _split_count(options, device, batch, head_groups, kv_len, sparse_kv_block)

    mods = inline_mods(score_mod, mask.mask_mod, dtype, score_mod_other_buffers,
                       mask_mod_other_buffers, device, options)
    query, key, value = (realize_fixed(x) for x in (query, key, value))
    mask_inputs, block_lists = block_mask_kernel_inputs(mask, has_full_blocks)

    # Per-split partial results, float32: the accumulator is the template's output; the
    # running max (base 2) and sum are written through mutated inputs.
    from torch._inductor.lowering import empty_strided

    stats_size = [batch, problem.q_heads, q_len, splits]
    acc_layout = ir.FixedLayout(device, torch.float32, stats_size + [v_head_dim],
                                stride=ir.FlexibleLayout.contiguous_strides(stats_size + [v_head_dim]))
    m_split = empty_strided(stats_size, None, dtype=torch.float32, device=device)
    l_split = empty_strided(stats_size, None, dtype=torch.float32, device=device)

    constexprs = dict(
        shape_constants(problem),
        **online_softmax_constants(options, mods.has_score_mod, scale),
        HAS_PARTIAL_BLOCKS=has_partial_blocks,
        HAS_FULL_BLOCKS=has_full_blocks,
        BLOCK_M=config.block_m,
        BLOCK_N=config.block_n,
        USE_TMA=False,
        IS_DIVISIBLE=known_true(sympy.Eq(sympy.Mod(kv_len, sparse_kv_block), 0)),
        HEADS_PER_PROGRAM=heads_per_program,
        SPLITS=splits,
    )
    acc_split = choose_kernel(
        decode_template(), "decode", [(config.num_warps, config.num_stages, constexprs)],
        input_nodes=[query, key, value, m_split, l_split] + mask_inputs, layout=acc_layout,
        subgraphs=mods.subgraphs, mutated_inputs=[m_split, l_split],
        call_sizes=query.get_size(),
        input_generators=block_mask_input_generators(5, block_lists, has_full_blocks),
        describe=configs_summary([config]))
    record_subgraph_symbols(acc_split, mods.captured, mods.subgraphs)
    return merge_splits(acc_split, m_split, l_split, dtype, device)


def merge_splits(acc_split, m_split, l_split, dtype, device):
    """``(out, lse, max_scores)`` from per-split partials (``acc [B, H, M, S, Ev]``,
    ``m``, ``l`` ``[B, H, M, S]``, max in base 2), as Inductor reductions over S and
    pointwise nodes: ``out`` stays unrealized, so what reads it fuses with the division.

    Each split's sum and accumulator are rescaled to the overall max; a row no split saw
    anything in (max -inf, sum 0) gives out 0, lse and max_scores -inf."""
    *rows, splits, v_head_dim = acc_split.get_size()
    load_m, load_l, load_acc = (x.make_loader() for x in (m_split, l_split, acc_split))

    def reduce(inner_fn, ranges, reduction_type):
        result = ir.Reduction.create(device=device, dst_dtype=torch.float32,
                                     src_dtype=torch.float32, inner_fn=inner_fn, ranges=ranges,
                                     reduction_ranges=[splits], reduction_type=reduction_type)
        result.realize()
        return result.make_loader()

    load_max = reduce(lambda index, s: load_m([*index, *s]), rows, "max")

    def finite_max(index):
        # A row with nothing seen keeps max -inf; subtract 0 instead (no -inf - -inf).
        row_max = load_max(index)
        return ops.where(ops.eq(row_max, ops.constant(float("-inf"), torch.float32)),
                         ops.constant(0.0, torch.float32), row_max)

    def weight(index, s):
        return ops.exp2(ops.sub(load_m([*index, *s]), finite_max(index)))

    load_sum = reduce(lambda index, s: ops.mul(load_l([*index, *s]), weight(index, s)),
                      rows, "sum")
    load_out_sum = reduce(
        lambda index, s: ops.mul(load_acc([*index[:-1], *s, index[-1]]), weight(index[:-1], s)),
        rows + [v_head_dim], "sum")

    def out_fn(index):
        row_sum = load_sum(index[:-1])
        safe_sum = ops.where(ops.eq(row_sum, ops.constant(0.0, torch.float32)),
                             ops.constant(1.0, torch.float32), row_sum)
        return ops.to_dtype(ops.truediv(load_out_sum(index), safe_sum), dtype)

    out = ir.Pointwise.create(device=device, dtype=dtype, inner_fn=out_fn,
                              ranges=rows + [v_head_dim])
    lse = ir.Pointwise.create(
        device=device, dtype=torch.float32, ranges=rows,
        inner_fn=lambda index: ops.mul(ops.add(load_max(index), ops.log2(load_sum(index))),
                                       ops.constant(LN2, torch.float32)))
    max_scores = ir.Pointwise.create(
        device=device, dtype=torch.float32, ranges=rows,
        inner_fn=lambda index: ops.mul(load_max(index), ops.constant(LN2, torch.float32)))
    return out, lse, max_scores
