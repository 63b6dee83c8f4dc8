"""CUDA lowering of the backward operator: one fused, block-sparse Triton kernel.

``lower_backward`` receives the backward operator's lowered arguments (docs/internals.md
order) and returns ``(grad_query, grad_key, grad_value, grad_buffers)``, or raises
``dispatch.Declined`` with the reason where the kernel does not apply (the dispatcher then
tries the next candidate). Steps, all decided before launch:

1. the cases the kernel covers (``common.attention_problem``, plus a key/value batch that
   equals the query's or is 1);
2. ``delta = rowsum(grad_out * out) - grad_lse`` as ordinary Inductor IR (a small reduction
   kernel Inductor generates and may fuse): with it, dS = P * (dP - delta) also carries the
   gradient of a returned lse (d lse / d score = P);
3. score_mod, mask_mod and the joint graph lowered to inlinable expressions; captured
   buffers that get gradients become zero-filled float32 (float64 under heavy contention)
   buffers the kernel adds into atomically (``subgraphs.build_joint_buffers``);
4. one choice per config from ``templates/backward.py.jinja`` + ``templates/common.py.jinja``;
   dK is the template's output (epilogues fuse into its store), dQ and dV are mutated inputs;
   with the TMA, q, dO, k and v also come as host-built descriptors (``descriptors.py``);
5. a key/value batch of 1 under a larger query batch is summed over batch afterwards, and
   buffer gradients are cast to their buffers' dtypes.
"""
import sympy
import torch
from torch._inductor import config as inductor_config
from torch._inductor import ir
from torch._inductor.utils import sympy_product
from torch._inductor.virtualized import V

from inductor_flex._block_lists import OperatorBlockMask

from .common import (
    LOG2E,
    approximate_tanh,
    float32_precision,
    folds_scale,
    attention_problem,
    block_mask_input_generators,
    choose_kernel,
    dense_strides_like,
    known_true,
    listed_block_kinds,
    lower_score_and_mask_mods,
    realize_captured,
    realize_fixed,
    record_subgraph_symbols,
    cached_template,
    shape_constants,
    tma_possible,
)
from .configs import select_backward_configs
from .dispatch import Declined
from .options import BACKWARD, PassOptions
from .descriptors import (
    DescriptorTemplateKernel,
    descriptor_input_generators,
    head_tile_descriptor,
    host_descriptors_usable,
)
from .subgraphs import (
    JOINT_PLACEHOLDERS,
    MASK_MOD_PLACEHOLDERS,
    SCORE_MOD_PLACEHOLDERS,
    ModLoweringError,
    build_joint_buffers,
    gathered_bytes_per_score,
    is_identity_score_mod,
    joint_buffer_gradients,
)


def _backward_grid(batch, q_heads, q_len, qk_head_dim, kv_heads, kv_len, meta, *, cdiv):
    """Axis 0: the dK/dV programs (one per BLOCK_N1 keys), then the dQ programs (one per
    BLOCK_M2 query rows and query head of the GQA group); axes 1, 2: batch, kv head."""
    group = cdiv(q_heads, kv_heads)  # exact: q_heads is a multiple of kv_heads
    return (cdiv(kv_len, meta["BLOCK_N1"]) + group * cdiv(q_len, meta["BLOCK_M2"]), batch, kv_heads)


def backward_template():
    """The backward TritonTemplate (its TMA tiles come from host-built descriptors)."""
    return cached_template("inductor_flex_bwd", _backward_grid, "backward.py.jinja",
                           kernel_type=DescriptorTemplateKernel)


def _delta(out, grad_out, grad_lse):
    """rowsum(grad_out * out) in float32, minus the lse gradient when there is one."""
    from torch._inductor.lowering import lowerings, to_dtype

    aten = torch.ops.aten
    product = lowerings[aten.mul.Tensor](to_dtype(grad_out, torch.float32),
                                         to_dtype(out, torch.float32))
    delta = lowerings[aten.sum.dim_IntList](product, [-1])
    if grad_lse is not None:
        delta = lowerings[aten.sub.Tensor](delta, to_dtype(grad_lse, torch.float32))
    return realize_fixed(delta)


def _zeros(size, dtype, device):
    """A realized zero buffer (kept as a TensorBox: it is also a returned value)."""
    from torch._inductor.lowering import full

    zeros = full(list(size), 0.0, dtype=dtype, device=device)
    zeros.realize()
    zeros.freeze_layout()
    return zeros


# A buffer gradient whose elements each receive more than this many scores' contributions
# (a per-head scale: B * S * S of them) is accumulated in float64: a chain of float32 atomic
# adds into one address rounds at every add, and over ~10^5 adds that can approach the
# float32 result's own precision; float64 keeps it far below. Tables with about one
# contribution per element (a full [B, H, S, S] bias) stay float32 (half the memory).
FLOAT64_ACCUMULATION_ABOVE = 256


def _gradient_accumulation_dtype(buffer, problem) -> torch.dtype:
    hint = V.graph.sizevars.optimization_hint
    scores = hint(problem.batch * problem.q_heads * problem.q_len * problem.kv_len)
    elements = max(1, hint(sympy_product(buffer.get_size())))
    return torch.float64 if scores > FLOAT64_ACCUMULATION_ABOVE * elements else torch.float32


def _use_tma(options, problem, tensors, num_choices: int) -> bool:
    """Stream the inner loops' tiles through the TMA: on Hopper and newer, for half-precision
    inputs, unless the user says otherwise (``USE_TMA`` / ``bwd_USE_TMA``); only where the
    tensors' layouts allow it and they can come as host-built descriptors, and not where
    several choices would be timed in a subprocess (it rebuilds the inputs as plain tensors,
    and a descriptor argument needs ``descriptors.example_descriptor``)."""
    requested = options.get("USE_TMA")
    wanted = (problem.dtype in (torch.float16, torch.bfloat16)) if requested is None else bool(requested)
    timed_elsewhere = num_choices > 1 and bool(inductor_config.autotune_in_subproc)
    return (wanted and not timed_elsewhere and tma_possible(problem.capability, tensors)
            and host_descriptors_usable(tensors))


def _early_dp(options, config) -> bool:
    """Issue dO v^T before the exponentials on full blocks: the config's choice unless the
    user says (``EARLY_DP`` / ``bwd_EARLY_DP``)."""
    requested = options.get("EARLY_DP")
    return config.early_dp if requested is None else bool(requested)


def lower_backward(query, key, value, out, logsumexp, grad_out, grad_logsumexp,
                   fw_graph, joint_graph, block_mask, scale, kernel_options,
                   score_mod_other_buffers=(), mask_mod_other_buffers=(), *, extra_choices=None):
    """Lower the backward operator to the fused Triton kernel (``Declined`` where it does
    not apply). ``extra_choices``: other kernels timed against ours (``common.choose_kernel``)."""
    options = PassOptions(kernel_options, BACKWARD)
    kernel_options = dict(kernel_options or {})
    mask = OperatorBlockMask(*block_mask)
    kv_num_blocks, kv_indices = mask.kv_num_blocks, mask.kv_indices
    full_kv_num_blocks, full_kv_indices = mask.full_kv_num_blocks, mask.full_kv_indices
    q_num_blocks, q_indices = mask.q_num_blocks, mask.q_indices
    full_q_num_blocks, full_q_indices = mask.full_q_num_blocks, mask.full_q_indices
    sparse_q_block, sparse_kv_block, mask_mod = mask.q_block_size, mask.kv_block_size, mask.mask_mod

    problem = attention_problem(query, key, value, (fw_graph, joint_graph, mask_mod),
                                sparse_q_block, sparse_kv_block, scale,
                                list(score_mod_other_buffers) + list(mask_mod_other_buffers))
    if grad_out.get_dtype() != problem.dtype:
        raise Declined(f"grad_out dtype {grad_out.get_dtype()} is not the inputs' {problem.dtype}")
    if q_num_blocks is None or q_indices is None:
        raise Declined("the block mask lacks the query-side block lists the dK/dV programs walk")
    if len(q_num_blocks.get_size()) != 3 or len(q_indices.get_size()) != 4:
        raise Declined("a hand-built block mask of another rank: the exact path checks it")
    if (full_kv_num_blocks is None) != (full_q_num_blocks is None):
        raise Declined("full blocks listed on one side only: each side must see the same set")
    # Key/value batch: the query's (one dK/dV per batch) or 1 (dK/dV per query batch, then
    # summed); anything else the kernel cannot index.
    if known_true(sympy.Eq(problem.kv_batch, problem.batch)):
        sum_over_batch = False
    elif known_true(sympy.Eq(problem.kv_batch, 1)):
        sum_over_batch = True
    else:
        raise Declined("key/value batch is neither the query's nor 1: the kernel cannot index it")

    dtype, scale, device = problem.dtype, problem.scale, query.get_device()
    qk_head_dim, v_head_dim = problem.qk_head_dim, problem.v_head_dim
    sparse_q_block, sparse_kv_block = problem.sparse_q_block, problem.sparse_kv_block
    # Tile-sized reads of captured buffers: the recomputed scores (score_mod, mask_mod) and
    # the score gradient (the joint graph's first output).
    gathered = (gathered_bytes_per_score(fw_graph, SCORE_MOD_PLACEHOLDERS, score_mod_other_buffers)
                + gathered_bytes_per_score(mask_mod, MASK_MOD_PLACEHOLDERS, mask_mod_other_buffers)
                + gathered_bytes_per_score(joint_graph, JOINT_PLACEHOLDERS, score_mod_other_buffers,
                                           output_index=0))
    configs = select_backward_configs(problem.capability, dtype, qk_head_dim, v_head_dim,
                                      sparse_q_block, sparse_kv_block, kernel_options,
                                      max_autotune=bool(inductor_config.max_autotune),
                                      gathered_bytes=gathered)
    if not configs:
        raise Declined(f"block mask BLOCK_SIZE ({sparse_q_block}, {sparse_kv_block}): no "
                       f"tl.dot tile of 16 or more divides it")

    has_partial_blocks, has_full_blocks = listed_block_kinds(
        kv_num_blocks, full_kv_num_blocks, full_kv_indices)

    # --- mods, the joint graph, and the buffers that get gradients -----------------------------
    score_mod_other_buffers = [realize_captured(b) for b in score_mod_other_buffers]
    mask_mod_other_buffers = [realize_captured(b) for b in mask_mod_other_buffers]
    has_score_mod = not is_identity_score_mod(fw_graph)
    # The recomputed probabilities must be the forward's: the same tanh as the forward.
    approx_tanh = approximate_tanh(dtype, options)
    try:
        wants_grad = joint_buffer_gradients(joint_graph, len(score_mod_other_buffers))
        grad_buffers = [_zeros(b.get_size(), _gradient_accumulation_dtype(b, problem), device)
                        if needed else None
                        for b, needed in zip(score_mod_other_buffers, wants_grad)]
        score_buffer, mask_buffer = lower_score_and_mask_mods(
            fw_graph, mask_mod, dtype, score_mod_other_buffers, mask_mod_other_buffers, device,
            approx_tanh)
        grad_score_buffer, scatters = build_joint_buffers(
            joint_graph, dtype, score_mod_other_buffers, grad_buffers, device,
            approx_tanh=approx_tanh)
    except ModLoweringError as error:
        raise Declined(f"a mod or its gradient the kernel cannot inline: {error}") from None

    # --- inputs and outputs ------------------------------------------------------------------
    query, key, value, logsumexp, grad_out = (
        realize_fixed(x) for x in (query, key, value, logsumexp, grad_out))
    delta = _delta(out, grad_out, grad_logsumexp)
    mask_inputs = [realize_fixed(x) for x in (kv_num_blocks, kv_indices, q_num_blocks, q_indices)]
    if has_full_blocks:
        mask_inputs += [realize_fixed(x) for x in (full_kv_num_blocks, full_kv_indices,
                                                   full_q_num_blocks, full_q_indices)]

    from torch._inductor.lowering import empty_strided

    batch, q_len = problem.batch, problem.q_len
    kv_heads, kv_len = problem.kv_heads, problem.kv_len
    grad_query = empty_strided(query.get_size(), dense_strides_like(query, query.get_size()),
                               dtype=dtype, device=device)
    # dK / dV per query batch; with a broadcast key/value batch they are summed below.
    # (float32 then, so the sum rounds once).
    kv_grad_dtype = torch.float32 if sum_over_batch else dtype
    dk_size = [batch, kv_heads, kv_len, qk_head_dim]
    dv_size = [batch, kv_heads, kv_len, v_head_dim]
    grad_value = empty_strided(dv_size, dense_strides_like(value, dv_size), dtype=kv_grad_dtype,
                               device=device)
    layout = ir.FixedLayout(device, kv_grad_dtype, dk_size, stride=dense_strides_like(key, dk_size))
    input_nodes = [query, key, value, logsumexp, delta, grad_out, grad_query, grad_value] + mask_inputs

    fold_scale = folds_scale(has_score_mod, scale)
    divisible = (known_true(sympy.Eq(sympy.Mod(q_len, sparse_q_block), 0))
                 and known_true(sympy.Eq(sympy.Mod(kv_len, sparse_kv_block), 0)))
    constants = dict(
        shape_constants(problem),
        IS_DIVISIBLE=divisible,
        HAS_PARTIAL_BLOCKS=has_partial_blocks,
        HAS_FULL_BLOCKS=has_full_blocks,
        HAS_SCORE_MOD=not fold_scale,
        HAS_BUFFER_GRADS=bool(scatters),
        SM_SCALE=scale,
        LOGIT_SCALE=scale * LOG2E if fold_scale else LOG2E,
        FLOAT32_PRECISION=float32_precision(),
    )

    launches = []
    for config in configs:
        launch = (config.num_warps, config.num_stages,
                  dict(constants, BLOCK_M1=config.block_m1, BLOCK_N1=config.block_n1,
                       BLOCK_M2=config.block_m2, BLOCK_N2=config.block_n2,
                       EARLY_DP=_early_dp(options, config)))
        if launch not in launches:  # the user's EARLY_DP can make two configs one kernel
            launches.append(launch)
    use_tma = _use_tma(options, problem, (query, key, value, grad_out), len(launches))
    for _, _, constexprs in launches:
        constexprs["USE_TMA"] = use_tma
    # The tiles the inner loops stream, as host-built descriptors, in the template's order
    # (Q_DESC, DO_DESC, K_DESC, V_DESC): the dK/dV programs read q and dO BLOCK_M1 rows at
    # a time, the dQ programs k and v BLOCK_N2 rows at a time. One descriptor per tensor
    # serves every choice (each declares its own tile).
    streamed = [(query, "BLOCK_M1", "QK_HEAD_DIM_ROUNDED"), (grad_out, "BLOCK_M1", "V_HEAD_DIM_ROUNDED"),
                (key, "BLOCK_N2", "QK_HEAD_DIM_ROUNDED"), (value, "BLOCK_N2", "V_HEAD_DIM_ROUNDED")]
    descriptors = ([head_tile_descriptor(x, rows, cols, launches[0][2]) for x, rows, cols in streamed]
                   if use_tma else [])
    # Kernel arguments: the eight named tensors (q ... dV), the block-mask tensors, the
    # descriptors (then the buffers the inlined mods read, which choose_kernel appends).
    block_lists = [(kv_indices, True), (q_indices, True)]
    if has_full_blocks:
        block_lists += [(full_kv_indices, False), (full_q_indices, False)]
    generators = block_mask_input_generators(8, block_lists, has_full_blocks)
    generators.update(descriptor_input_generators(len(input_nodes), descriptors))
    input_nodes += descriptors
    grad_key = choose_kernel(
        backward_template(), "attention_backward", launches, input_nodes=input_nodes,
        layout=layout, subgraphs=[score_buffer, mask_buffer, grad_score_buffer, scatters],
        mutated_inputs=[grad_query, grad_value] + [g for g in grad_buffers if g is not None],
        call_sizes=list(query.get_size()) + [kv_heads, kv_len],
        input_generators=generators,
        describe=str(configs), extra_choices=extra_choices)
    record_subgraph_symbols(grad_key, score_mod_other_buffers + mask_mod_other_buffers,
                            [score_buffer, mask_buffer, grad_score_buffer] + list(scatters))

    from torch._inductor.lowering import to_dtype

    if sum_over_batch:
        from torch._inductor.lowering import lowerings

        total = lowerings[torch.ops.aten.sum.dim_IntList]
        grad_key = to_dtype(total(grad_key, [0], True), dtype)
        grad_value = to_dtype(total(grad_value, [0], True), dtype)

    grad_score_mod_buffers = tuple(
        None if g is None else to_dtype(g, buffer.get_dtype())
        for g, buffer in zip(grad_buffers, score_mod_other_buffers))
    return grad_query, grad_key, grad_value, grad_score_mod_buffers
