"""CUDA lowering of the forward operator: one fused, block-sparse Triton kernel.

``lower_forward`` receives the operator's lowered arguments (docs/internals.md order):
Inductor IR nodes for the tensors, ``ir.Subgraph`` for score_mod and for the block mask's
mask_mod, Python (or sympy) scalars for the rest. It

1. decides whether the fused kernel applies, and raises ``dispatch.Declined`` with the
   reason when it does not (the dispatcher then tries the next kernel);
2. lowers score_mod and mask_mod to inlinable expressions (``subgraphs.py``);
3. settles every kernel constant in Python: tile configs (``configs.py``), which outputs
   are written, whether bounds checks are needed, how the scale is folded;
4. renders one choice per config from ``templates/forward.py.jinja`` +
   ``templates/common.py.jinja`` and lets ``autotune_select_algorithm`` pick;
5. returns ``(out, lse, max_scores)``; ``out`` is the template's own output, so pointwise
   epilogues (``.cos()``, a cast, ...) fuse into the kernel's store.
"""
import sympy
import torch
from torch._inductor import config as inductor_config
from torch._inductor import ir

from inductor_flex._block_lists import OperatorBlockMask

from .common import (
    attention_problem,
    block_mask_input_generators,
    block_mask_kernel_inputs,
    cached_template,
    choose_kernel,
    dense_strides_like,
    inline_mods,
    known_true,
    listed_block_kinds,
    online_softmax_constants,
    output_used,
    realize_fixed,
    record_subgraph_symbols,
    shape_constants,
    tma_possible,
)
from .dispatch import Declined
from .options import FORWARD, PassOptions
from .configs import configs_summary, select_forward_configs
from .subgraphs import (
    MASK_MOD_PLACEHOLDERS,
    SCORE_MOD_PLACEHOLDERS,
    gathered_bytes_per_score,
)


def _forward_grid(batch, q_heads, q_len, head_dim, meta, *, cdiv):
    """One program per (BLOCK_M query rows, batch, query head)."""
    return (cdiv(q_len, meta["BLOCK_M"]), batch, q_heads)


def forward_template():
    """The forward TritonTemplate."""
    return cached_template("inductor_flex_fwd", _forward_grid, "forward.py.jinja")


# ---------------------------------------------------------------------------------------
# The lowering
# ---------------------------------------------------------------------------------------

def lower_forward(query, key, value, score_mod, block_mask, scale, kernel_options,
                  score_mod_other_buffers=(), mask_mod_other_buffers=(), *, extra_choices=None):
    """Lower the forward operator to the fused Triton kernel (``Declined`` where it does
    not apply). ``extra_choices``: other kernels timed against ours (``common.choose_kernel``)."""
    options = PassOptions(kernel_options, FORWARD)
    kernel_options = dict(kernel_options or {})
    mask = OperatorBlockMask(*block_mask)
    sparse_q_block, sparse_kv_block, mask_mod = mask.q_block_size, mask.kv_block_size, mask.mask_mod

    problem = attention_problem(query, key, value, (score_mod, mask_mod), sparse_q_block,
                                sparse_kv_block, scale,
                                list(score_mod_other_buffers) + list(mask_mod_other_buffers))
    dtype, scale = problem.dtype, problem.scale
    batch, q_heads, q_len = problem.batch, problem.q_heads, problem.q_len
    kv_len = problem.kv_len
    qk_head_dim, v_head_dim = problem.qk_head_dim, problem.v_head_dim
    sparse_q_block, sparse_kv_block = problem.sparse_q_block, problem.sparse_kv_block

    # What the block mask's contents tell at compile time: with no mask given, flex_attention
    # builds one in the graph (no partial blocks, every block full and in order).
    has_partial_blocks, has_full_blocks = listed_block_kinds(
        mask.kv_num_blocks, mask.full_kv_num_blocks, mask.full_kv_indices)

    capability = problem.capability
    gathered = (gathered_bytes_per_score(score_mod, SCORE_MOD_PLACEHOLDERS, score_mod_other_buffers)
                + gathered_bytes_per_score(mask_mod, MASK_MOD_PLACEHOLDERS, mask_mod_other_buffers))
    configs = select_forward_configs(capability, dtype, qk_head_dim, v_head_dim,
                                     sparse_q_block, sparse_kv_block, kernel_options,
                                     max_autotune=bool(inductor_config.max_autotune),
                                     mask_free=not has_partial_blocks, gathered_bytes=gathered)
    if not configs:
        raise Declined(f"block mask BLOCK_SIZE ({sparse_q_block}, {sparse_kv_block}): no "
                       f"tl.dot tile of 16 or more divides it")

    # --- score_mod / mask_mod -> inlinable expressions ---------------------------------------
    device = query.get_device()
    mods = inline_mods(score_mod, mask_mod, dtype, score_mod_other_buffers,
                       mask_mod_other_buffers, device, options)

    # --- inputs and outputs -------------------------------------------------------------------
    query, key, value = (realize_fixed(x) for x in (query, key, value))
    mask_inputs, block_lists = block_mask_kernel_inputs(mask, has_full_blocks)

    from torch._inductor.lowering import empty_strided

    out_size = [batch, q_heads, q_len, v_head_dim]
    layout = ir.FixedLayout(device, dtype, out_size, stride=dense_strides_like(query, out_size))
    lse = empty_strided([batch, q_heads, q_len], None, dtype=torch.float32, device=device)
    # max_scores gets a full buffer only when the graph reads it; otherwise the kernel's MAX
    # argument is a one-element placeholder (never written: OUTPUT_MAX is False) and the
    # returned max_scores is an unrealized fill that dead-code elimination drops.
    output_max = output_used(2, options.flag("OUTPUT_MAX", True))
    if output_max:
        max_scores = empty_strided([batch, q_heads, q_len], None, dtype=torch.float32, device=device)
        max_argument = max_scores
    else:
        from torch._inductor.lowering import full

        max_scores = full([batch, q_heads, q_len], float("nan"), dtype=torch.float32, device=device)
        max_argument = empty_strided([1, 1, 1], None, dtype=torch.float32, device=device)
    input_nodes = [query, key, value, lse, max_argument] + mask_inputs

    # --- constants decided here, not in the kernel ---------------------------------------------
    # TMA: a config's preference unless the user says; only where the GPU and layouts allow.
    tma_requested = options.get("USE_TMA")
    tma_allowed = tma_possible(capability, (query, key, value))
    divisible = (known_true(sympy.Eq(sympy.Mod(kv_len, sparse_kv_block), 0)))
    constants = dict(
        shape_constants(problem),
        **online_softmax_constants(options, mods.has_score_mod, scale),
        HAS_PARTIAL_BLOCKS=has_partial_blocks,
        HAS_FULL_BLOCKS=has_full_blocks,
        OUTPUT_LOGSUMEXP=output_used(1, options.flag("OUTPUT_LOGSUMEXP", True)),
        OUTPUT_MAX=output_max,
    )

    # --- one choice per config -----------------------------------------------------------------
    launches = []
    seen = set()
    for config in configs:
        use_tma = (config.tma if tma_requested is None else bool(tma_requested)) and tma_allowed
        launch = (config.block_m, config.block_n, config.num_warps, config.num_stages, use_tma)
        if launch in seen:
            continue  # the same kernel as an earlier choice once TMA is resolved
        seen.add(launch)
        constexprs = dict(constants, BLOCK_M=config.block_m, BLOCK_N=config.block_n, USE_TMA=use_tma)
        # The query side only needs BLOCK_M to divide Q_LEN: partial query tiles never read
        # the block mask beyond its last row.
        constexprs["IS_DIVISIBLE"] = divisible and known_true(sympy.Eq(sympy.Mod(q_len, config.block_m), 0))
        launches.append((config.num_warps, config.num_stages, constexprs))

    out = choose_kernel(
        forward_template(), "attention", launches, input_nodes=input_nodes, layout=layout,
        subgraphs=mods.subgraphs,
        mutated_inputs=[lse, max_scores] if output_max else [lse],
        call_sizes=query.get_size(),
        input_generators=block_mask_input_generators(5, block_lists, has_full_blocks),
        describe=configs_summary(configs), extra_choices=extra_choices)
    record_subgraph_symbols(out, mods.captured, mods.subgraphs)
    return out, lse, max_scores
