"""Tile configurations for the fused forward and backward kernels: per-GPU tables and the
one walker that reads them.

A config is the launch shape of one kernel choice. ``ForwardConfig``: the tile
(``BLOCK_M`` query rows x ``BLOCK_N`` keys per inner step), ``num_warps``, ``num_stages``
(the software-pipelining depth of the K/V loads) and whether K/V come through the TMA.
``BackwardConfig``: the dK/dV programs' and the dQ programs' tiles, warps, stages and the
early dP order. Inductor compiles one choice per config and, when more than one survives,
times them and keeps the fastest.

The data (``GENERATIONS``): one ``Generation`` per GPU generation, naming its compute
capabilities, the shared memory one program may use, whether tiles may come through the
TMA, and two tables (half precision, float32) with a row per head-dim bound holding the
forward and the backward default side by side; plus the candidate sets ``max_autotune``
tries. A capability no generation lists gets ``FALLBACK``: the smallest tables, 48 KB of
shared memory, no TMA (one debug-log line says so). To serve a new GPU, add a
``Generation``.

The walker and the functions the lowerings call:

- ``generation_of`` and ``table_row`` find the generation and the row (head dims
  round up to ``padded_head_dim``; the larger of the qk and v dims picks the row).
- ``default_forward_config`` / ``default_backward_config``: the row's configs; what an
  ordinary ``torch.compile`` uses.
- ``autotune_forward_configs``: the wider forward set tried under ``max_autotune``.
- ``select_forward_configs`` / ``select_backward_configs`` apply the user's kernel options
  (``BLOCK_M``, ``BLOCK_N``, ``num_warps``, ``num_stages`` with a ``fwd_`` prefix that
  takes precedence; ``BLOCK_M1``, ``BLOCK_N1``, ``BLOCK_M2``, ``BLOCK_N2``, ``num_warps``,
  ``num_stages`` with ``bwd_``), keep the default within shared memory and drop configs
  whose tile does not divide the block mask's sparse block.
- ``shared_memory_limit`` and ``tma_loads_allowed``: the generation's limits.

Everything here is plain Python (no CUDA needed), so it is decided before launch and is
unit-tested on the CPU (``tests/test_configs.py``).
"""
import logging
from dataclasses import dataclass, replace
from typing import Mapping, Optional, Sequence, Tuple

import torch

from .options import BACKWARD, FORWARD, PassOptions

log = logging.getLogger(__name__)

# tl.dot needs at least 16 along every dimension.
MIN_TILE = 16


@dataclass(frozen=True)
class ForwardConfig:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    # Load K/V (and Q) through the TMA when the GPU and the tensors allow it (Hopper+).
    tma: bool = False


@dataclass(frozen=True)
class BackwardConfig:
    """Launch shape of the backward kernel: dK/dV programs own ``block_n1`` keys and step
    ``block_m1`` query rows at a time; dQ programs own ``block_m2`` rows and step
    ``block_n2`` keys at a time."""
    block_m1: int
    block_n1: int
    block_m2: int
    block_n2: int
    num_warps: int
    num_stages: int
    # On full blocks, issue dO v^T right after q k^T (before the exponentials); measured
    # on H100 faster with the D=64 tiles, mixed at D=128 (docs/measurements.md, EARLY_DP).
    early_dp: bool = False


@dataclass(frozen=True)
class HeadDimRow:
    """The default configs for head dims up to ``max_head_dim`` (padded, the larger of the
    qk and v dims); the last row of a table also takes anything larger."""
    max_head_dim: int
    forward: ForwardConfig
    backward: BackwardConfig
    # The forward when no block needs mask_mod (only full blocks are listed, e.g. no block
    # mask), so the kernel has no masked loop; None: ``forward``.
    forward_mask_free: Optional[ForwardConfig] = None


@dataclass(frozen=True)
class Generation:
    """What one GPU generation runs: its defaults by dtype and head dim, its autotune sets
    and its limits."""
    name: str
    capabilities: Tuple[Tuple[int, int], ...]
    shared_memory: int  # bytes one program may use
    tma_loads: bool     # tiles may come through the TMA (tensor descriptors)
    half: Tuple[HeadDimRow, ...]     # float16 and bfloat16
    float32: Tuple[HeadDimRow, ...]  # float32 (and any other dtype)
    forward_autotune: Tuple[ForwardConfig, ...]
    backward_autotune: Tuple[BackwardConfig, ...]


# ---------------------------------------------------------------------------------------
# The tables: head-dim rows, forward and backward side by side
# ---------------------------------------------------------------------------------------

# Measured on H100 (docs/measurements.md: Forward tiles, Backward tiles, D128 default).
# Forward: one warpgroup per tile, a shallow pipeline and TMA loads win at D=64 and D=128.
# Without a masked loop at D=128, 64x128 with one stage (80 KB: two programs per SM, each
# hiding the other's TMA latency) beat 128x64 by 4-5%; with masks it was mixed (packed
# documents 3.6x slower).
# Backward: square 64 tiles on one warpgroup. At D=128 two stages keep a program near
# 96 KB of shared memory, so two run per SM and fill each other's exponential stalls (3-9%
# over 128-key programs of two warpgroups, one per SM); dP early helped at D=64 only (at
# D=128 it cost ALiBi 8%).
HOPPER_HALF = (
    HeadDimRow(64, forward=ForwardConfig(64, 128, 4, 2, tma=True),
               backward=BackwardConfig(64, 64, 64, 64, 4, 3, early_dp=True)),
    HeadDimRow(128, forward=ForwardConfig(128, 64, 4, 2, tma=True),
               forward_mask_free=ForwardConfig(64, 128, 4, 1, tma=True),
               backward=BackwardConfig(64, 64, 64, 64, 4, 2)),
    HeadDimRow(256, forward=ForwardConfig(64, 64, 4, 2),
               backward=BackwardConfig(32, 64, 64, 32, 4, 1)),
)

# float32 on A100, Hopper and Blackwell (consumer Blackwell included, as the earlier
# capability rules gave it).
DATACENTER_FLOAT32 = (
    HeadDimRow(64, forward=ForwardConfig(128, 32, 4, 3),
               backward=BackwardConfig(32, 64, 64, 32, 4, 2)),
    HeadDimRow(128, forward=ForwardConfig(64, 32, 4, 3),
               backward=BackwardConfig(32, 64, 64, 32, 4, 1)),
    HeadDimRow(256, forward=ForwardConfig(32, 32, 4, 2),
               backward=BackwardConfig(16, 32, 32, 16, 4, 1)),
)

# The A100 keeps the two-warpgroup backward tile (the H100 sweep's winners were not
# measured there) and the plain dP order.
A100_HALF = (
    HeadDimRow(64, forward=ForwardConfig(128, 64, 4, 3),
               backward=BackwardConfig(64, 64, 64, 64, 4, 3)),
    HeadDimRow(128, forward=ForwardConfig(128, 64, 8, 3),
               backward=BackwardConfig(64, 128, 128, 64, 8, 2)),
    HeadDimRow(256, forward=ForwardConfig(64, 32, 4, 2),
               backward=BackwardConfig(32, 64, 64, 32, 4, 1)),
)

# Consumer parts: about 100 KB of shared memory.
CONSUMER_HALF = (
    HeadDimRow(64, forward=ForwardConfig(128, 64, 4, 2),
               backward=BackwardConfig(64, 64, 64, 64, 4, 2)),
    HeadDimRow(128, forward=ForwardConfig(64, 64, 4, 2),
               backward=BackwardConfig(32, 64, 64, 32, 4, 2)),
    HeadDimRow(256, forward=ForwardConfig(32, 32, 4, 2),
               backward=BackwardConfig(16, 32, 32, 16, 4, 1)),
)

CONSUMER_FLOAT32 = (
    HeadDimRow(64, forward=ForwardConfig(64, 32, 4, 2),
               backward=BackwardConfig(32, 64, 64, 32, 4, 2)),
    HeadDimRow(128, forward=ForwardConfig(32, 32, 4, 2),
               backward=BackwardConfig(32, 64, 64, 32, 4, 1)),
    HeadDimRow(256, forward=ForwardConfig(32, 16, 4, 1),
               backward=BackwardConfig(16, 32, 32, 16, 4, 1)),
)

# Volta and Turing: the consumer forward tiles; the smallest backward tiles, one stage.
PRE_AMPERE_HALF = (
    HeadDimRow(64, forward=ForwardConfig(128, 64, 4, 2),
               backward=BackwardConfig(32, 64, 64, 32, 4, 1)),
    HeadDimRow(128, forward=ForwardConfig(64, 64, 4, 2),
               backward=BackwardConfig(16, 32, 32, 16, 4, 1)),
    HeadDimRow(256, forward=ForwardConfig(32, 32, 4, 2),
               backward=BackwardConfig(16, 32, 32, 16, 4, 1)),
)

PRE_AMPERE_FLOAT32 = (
    HeadDimRow(64, forward=ForwardConfig(64, 32, 4, 2),
               backward=BackwardConfig(32, 64, 64, 32, 4, 1)),
    HeadDimRow(128, forward=ForwardConfig(32, 32, 4, 2),
               backward=BackwardConfig(16, 32, 32, 16, 4, 1)),
    HeadDimRow(256, forward=ForwardConfig(32, 16, 4, 1),
               backward=BackwardConfig(16, 32, 32, 16, 4, 1)),
)

# Consumer Blackwell (sm_120/121, about 100 KB, TMA, no wgmma): Hopper's forward tiles
# and the consumer backward tiles, as the earlier capability rules gave them (not
# measured on these parts).
CONSUMER_BLACKWELL_HALF = (
    HeadDimRow(64, forward=ForwardConfig(64, 128, 4, 2, tma=True),
               backward=BackwardConfig(64, 64, 64, 64, 4, 2)),
    HeadDimRow(128, forward=ForwardConfig(128, 64, 4, 2, tma=True),
               forward_mask_free=ForwardConfig(64, 128, 4, 1, tma=True),
               backward=BackwardConfig(32, 64, 64, 32, 4, 2)),
    HeadDimRow(256, forward=ForwardConfig(64, 64, 4, 2),
               backward=BackwardConfig(16, 32, 32, 16, 4, 1)),
)

# ---------------------------------------------------------------------------------------
# The max-autotune candidate sets (each filtered by the generation's shared memory)
# ---------------------------------------------------------------------------------------

FORWARD_AUTOTUNE = (
    ForwardConfig(128, 64, 4, 2, tma=True),
    ForwardConfig(64, 128, 4, 1, tma=True),
    ForwardConfig(128, 128, 4, 3, tma=True),
    ForwardConfig(64, 128, 4, 3, tma=True),
    ForwardConfig(128, 128, 8, 2, tma=True),
    ForwardConfig(128, 128, 8, 2),
    ForwardConfig(128, 128, 8, 3),
    ForwardConfig(128, 64, 8, 3),
    ForwardConfig(128, 64, 4, 3),
    ForwardConfig(128, 128, 4, 2),
    ForwardConfig(128, 32, 4, 3),
    ForwardConfig(64, 128, 4, 3),
    ForwardConfig(64, 64, 4, 3),
    ForwardConfig(64, 32, 4, 3),
    ForwardConfig(32, 32, 4, 2),
)
FORWARD_AUTOTUNE_WITHOUT_TMA = tuple(c for c in FORWARD_AUTOTUNE if not c.tma)

BACKWARD_AUTOTUNE = (
    BackwardConfig(64, 128, 128, 64, 8, 3),
    BackwardConfig(64, 128, 128, 64, 8, 2),
    BackwardConfig(32, 128, 128, 32, 4, 3),
    BackwardConfig(64, 64, 64, 64, 4, 3),
    BackwardConfig(64, 64, 64, 64, 4, 3, early_dp=True),
    BackwardConfig(64, 64, 64, 64, 4, 2),
    BackwardConfig(32, 64, 64, 32, 4, 3),
    BackwardConfig(64, 128, 128, 64, 4, 2),
    BackwardConfig(32, 32, 32, 32, 4, 1),
)

# ---------------------------------------------------------------------------------------
# The generations
# ---------------------------------------------------------------------------------------

# Pre-Hopper generations keep the TMA candidates in their autotune set (as before): the
# lowerings load without the TMA where ``tma_loads_allowed`` says no, so they compile as
# plain loads.
GENERATIONS = (
    Generation("Volta / Turing", capabilities=((7, 0), (7, 2), (7, 5)),
               shared_memory=48 * 1024, tma_loads=False,
               half=PRE_AMPERE_HALF, float32=PRE_AMPERE_FLOAT32,
               forward_autotune=FORWARD_AUTOTUNE, backward_autotune=BACKWARD_AUTOTUNE),
    Generation("Ampere datacenter (A100)", capabilities=((8, 0),),
               shared_memory=163 * 1024, tma_loads=False,
               half=A100_HALF, float32=DATACENTER_FLOAT32,
               forward_autotune=FORWARD_AUTOTUNE, backward_autotune=BACKWARD_AUTOTUNE),
    Generation("Ampere / Ada consumer and embedded", capabilities=((8, 6), (8, 7), (8, 9)),
               shared_memory=99 * 1024, tma_loads=False,
               half=CONSUMER_HALF, float32=CONSUMER_FLOAT32,
               forward_autotune=FORWARD_AUTOTUNE, backward_autotune=BACKWARD_AUTOTUNE),
    Generation("Hopper (H100, H200)", capabilities=((9, 0),),
               shared_memory=227 * 1024, tma_loads=True,
               half=HOPPER_HALF, float32=DATACENTER_FLOAT32,
               forward_autotune=FORWARD_AUTOTUNE, backward_autotune=BACKWARD_AUTOTUNE),
    # Hopper's tables (not measured on Blackwell).
    Generation("Blackwell datacenter (B200, B300)", capabilities=((10, 0), (10, 3)),
               shared_memory=227 * 1024, tma_loads=True,
               half=HOPPER_HALF, float32=DATACENTER_FLOAT32,
               forward_autotune=FORWARD_AUTOTUNE, backward_autotune=BACKWARD_AUTOTUNE),
    Generation("Blackwell consumer (RTX 50, DGX Spark)", capabilities=((12, 0), (12, 1)),
               shared_memory=99 * 1024, tma_loads=True,
               half=CONSUMER_BLACKWELL_HALF, float32=DATACENTER_FLOAT32,
               forward_autotune=FORWARD_AUTOTUNE, backward_autotune=BACKWARD_AUTOTUNE),
)

# For a capability no generation lists (a newer GPU, or a non-NVIDIA device that reports
# one): the smallest tables and the 48 KB every CUDA GPU grants a program without opting
# in; no TMA (not in the defaults, the autotune set or the loads) and no early dP in the
# defaults. Correct and slow beats fast tiles that do not fit: add the GPU's generation
# above to get its speed.
FALLBACK = Generation(
    "unknown GPU (conservative fallback)", capabilities=(),
    shared_memory=48 * 1024, tma_loads=False,
    half=PRE_AMPERE_HALF, float32=PRE_AMPERE_FLOAT32,
    forward_autotune=FORWARD_AUTOTUNE_WITHOUT_TMA, backward_autotune=BACKWARD_AUTOTUNE)

_GENERATION_OF_CAPABILITY = {
    capability: generation for generation in GENERATIONS for capability in generation.capabilities}
assert len(_GENERATION_OF_CAPABILITY) == sum(len(g.capabilities) for g in GENERATIONS), \
    "a capability listed by two generations"

_UNKNOWN_CAPABILITIES_LOGGED = set()


# ---------------------------------------------------------------------------------------
# The walker
# ---------------------------------------------------------------------------------------

def generation_of(capability: Tuple[int, int]) -> Generation:
    """The generation that lists this compute capability, else ``FALLBACK`` (with one
    debug-log line per capability and process)."""
    capability = tuple(capability)
    generation = _GENERATION_OF_CAPABILITY.get(capability)
    if generation is not None:
        return generation
    if capability not in _UNKNOWN_CAPABILITIES_LOGGED:
        _UNKNOWN_CAPABILITIES_LOGGED.add(capability)
        log.debug("inductor_flex: no config table for compute capability %s "
                  "(lowering/configs.py, GENERATIONS); using the %s: %d KB of shared memory, "
                  "no TMA", capability, FALLBACK.name, FALLBACK.shared_memory // 1024)
    return FALLBACK


def padded_head_dim(head_dim: int) -> int:
    """The head dim as the kernel tiles it: the next power of 2, at least 16."""
    return max(MIN_TILE, 1 << max(0, (int(head_dim) - 1).bit_length()))


def _is_half(dtype: torch.dtype) -> bool:
    return dtype in (torch.float16, torch.bfloat16)


def table_row(capability: Tuple[int, int], dtype: torch.dtype, qk_head_dim: int,
              v_head_dim: int) -> HeadDimRow:
    """The row of this GPU's table for the dtype (half precision or not) and the head dims:
    the first whose bound holds the larger padded head dim, else the last."""
    generation = generation_of(capability)
    table = generation.half if _is_half(dtype) else generation.float32
    head_dim = max(padded_head_dim(qk_head_dim), padded_head_dim(v_head_dim))
    for row in table:
        if head_dim <= row.max_head_dim:
            return row
    return table[-1]


def shared_memory_limit(capability: Tuple[int, int]) -> int:
    """Bytes of shared memory one program may use on this GPU generation."""
    return generation_of(capability).shared_memory


def tma_loads_allowed(capability: Tuple[int, int]) -> bool:
    """Whether this GPU generation may load tiles through the TMA (Hopper and newer parts
    in the tables; never on the fallback)."""
    return generation_of(capability).tma_loads


def staged_gathers(tile_scores: int, num_stages: int, gathered_bytes: int) -> int:
    """Shared memory of the mods' tile-sized gathers (``gathered_bytes`` per score, see
    ``subgraphs.gathered_bytes_per_score``): the pipeline keeps one tile of each per stage
    beyond the first (H100, Triton 3.6: four float32 [S, S] tables at 2 stages took 4 x 32 KB
    on top of the backward's 131 KB); with one stage they go straight to registers."""
    return gathered_bytes * tile_scores * max(0, num_stages - 1)


def estimated_shared_memory(config: ForwardConfig, dtype: torch.dtype, qk_head_dim: int,
                            v_head_dim: int, gathered_bytes: int = 0) -> int:
    """Shared memory the tile needs, roughly: Q resident, K and V staged ``num_stages`` deep,
    plus the mods' staged gathers."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    dqk, dv = padded_head_dim(qk_head_dim), padded_head_dim(v_head_dim)
    staged = max(1, config.num_stages) * config.block_n * (dqk + dv)
    return ((config.block_m * dqk + staged) * itemsize
            + staged_gathers(config.block_m * config.block_n, config.num_stages, gathered_bytes))


# ---------------------------------------------------------------------------------------
# The forward kernel
# ---------------------------------------------------------------------------------------

def default_forward_config(capability: Tuple[int, int], dtype: torch.dtype, qk_head_dim: int,
                           v_head_dim: int, mask_free: bool = False) -> ForwardConfig:
    """One good config for this GPU, dtype and head dims (what plain torch.compile runs).

    ``mask_free``: no block needs mask_mod (only full blocks are listed, e.g. no block
    mask), so the kernel has no masked loop.
    """
    row = table_row(capability, dtype, qk_head_dim, v_head_dim)
    if mask_free and row.forward_mask_free is not None:
        return row.forward_mask_free
    return row.forward


def autotune_forward_configs(capability: Tuple[int, int], dtype: torch.dtype, qk_head_dim: int,
                             v_head_dim: int, mask_free: bool = False,
                             gathered_bytes: int = 0) -> list:
    """The configs tried under max_autotune: the default first (made shallower if the mods'
    staged gathers need it), then every candidate of the generation's set whose staged
    tiles and gathers fit the GPU's shared memory."""
    limit = shared_memory_limit(capability)

    def estimate(config):
        return estimated_shared_memory(config, dtype, qk_head_dim, v_head_dim, gathered_bytes)

    default = default_forward_config(capability, dtype, qk_head_dim, v_head_dim, mask_free)
    configs = [fewer_stages_to_fit(default, estimate, limit)]
    for config in generation_of(capability).forward_autotune:
        if config not in configs and estimate(config) <= limit:
            configs.append(config)
    return configs


# The launch fields a user may set through kernel_options, and the config field each sets.
_OPTION_FIELDS = {
    "BLOCK_M": "block_m",
    "BLOCK_N": "block_n",
    "num_warps": "num_warps",
    "num_stages": "num_stages",
}


def tile_options(kernel_options: Mapping, fields: Mapping = _OPTION_FIELDS,
                 prefix: str = FORWARD) -> dict:
    """The launch fields the user fixed, by config field name, as the pass of ``prefix``
    reads them (``options.PassOptions``: ``<prefix>X`` over ``X``, any case)."""
    options = PassOptions(kernel_options, prefix)
    fixed = {}
    for option, field in fields.items():
        key, value = options.lookup(option)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"kernel option {key} must be a positive int, got {value!r}")
        fixed[field] = int(value)
    return fixed


def _is_power_of_2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _tile_walks(tile: int, sparse: int) -> bool:
    """Whether a tile side can walk a sparse block side: a power of 2 of at least 16 that
    divides it (so each tile lies in exactly one sparse block)."""
    return _is_power_of_2(tile) and tile >= MIN_TILE and sparse % tile == 0


def _halved_to_divide(tile: int, sparse: int) -> int:
    while tile >= MIN_TILE and sparse % tile:
        tile //= 2
    return tile


def _check_user_tiles(fixed: Mapping, fields: Mapping, sparse_q_block: int, sparse_kv_block: int,
                      what: str) -> None:
    """A tile option the user fixed must walk the block mask (``_tile_walks``); ``fields``
    maps option names (``BLOCK_M..`` on the query side, ``BLOCK_N..`` on the key side) to
    config fields."""
    for option, field in fields.items():
        if field not in fixed or not option.startswith("BLOCK"):
            continue
        sparse, name = ((sparse_q_block, "Q_BLOCK_SIZE") if option.startswith("BLOCK_M")
                        else (sparse_kv_block, "KV_BLOCK_SIZE"))
        size = fixed[field]
        if not _tile_walks(size, sparse):
            raise ValueError(
                f"kernel option {option}={size}: the {what} must be a power of 2 of at least "
                f"{MIN_TILE} that divides the block mask's {name}={sparse}")


def tile_fits(config: ForwardConfig, sparse_q_block: int, sparse_kv_block: int) -> bool:
    """Whether the forward tile can walk the block mask (``_tile_walks`` on both sides)."""
    return _tile_walks(config.block_m, sparse_q_block) and _tile_walks(config.block_n, sparse_kv_block)


def _shrink_to_fit(config: ForwardConfig, sparse_q_block: int, sparse_kv_block: int
                   ) -> Optional[ForwardConfig]:
    """The default tile halved until it divides the sparse blocks, or None if it cannot."""
    block_m = _halved_to_divide(config.block_m, sparse_q_block)
    block_n = _halved_to_divide(config.block_n, sparse_kv_block)
    shrunk = replace(config, block_m=block_m, block_n=block_n,
                     num_warps=config.num_warps if block_m >= 128 else min(config.num_warps, 4))
    return shrunk if tile_fits(shrunk, sparse_q_block, sparse_kv_block) else None


def select_forward_configs(capability: Tuple[int, int], dtype: torch.dtype, qk_head_dim: int,
                           v_head_dim: int, sparse_q_block: int, sparse_kv_block: int,
                           kernel_options: Mapping, max_autotune: bool,
                           mask_free: bool = False, gathered_bytes: int = 0) -> list:
    """The configs to compile, after the user's options and the sparse-block rule.

    - Options that fix a launch field apply to every config (duplicates merge).
    - A tile size the user fixed must be a power of 2 of at least 16 dividing its sparse
      block size; otherwise ``ValueError`` naming both.
    - A candidate whose tile does not divide the sparse blocks is skipped under
      max_autotune; the default tile is halved until it fits.
    - The default keeps fewer pipeline stages where the mods' tile-sized gathers
      (``gathered_bytes`` per score) would overflow shared memory, unless the user fixed
      ``num_stages``.
    - An empty list means no tile can walk this block mask (e.g. sparse blocks under 16).
    """
    fixed = tile_options(kernel_options)
    _check_user_tiles(fixed, _OPTION_FIELDS, sparse_q_block, sparse_kv_block, "tile")
    default = replace(default_forward_config(capability, dtype, qk_head_dim, v_head_dim, mask_free),
                      **fixed)
    if "num_stages" not in fixed:
        default = fewer_stages_to_fit(
            default, lambda c: estimated_shared_memory(c, dtype, qk_head_dim, v_head_dim, gathered_bytes),
            shared_memory_limit(capability))
    candidates = [default]
    if max_autotune:
        candidates += [replace(c, **fixed) for c in autotune_forward_configs(
            capability, dtype, qk_head_dim, v_head_dim, mask_free, gathered_bytes)]

    return walkable_configs(candidates, tile_fits, _shrink_to_fit, sparse_q_block, sparse_kv_block)


def walkable_configs(candidates: Sequence, fits, shrink, sparse_q_block: int,
                     sparse_kv_block: int) -> list:
    """The candidates whose tiles can walk the block mask (``fits``), in order and without
    repeats; the first (the default) is shrunk to fit instead of dropped, if it can be."""
    chosen = []
    for position, config in enumerate(candidates):
        if not fits(config, sparse_q_block, sparse_kv_block):
            if position:
                continue
            config = shrink(config, sparse_q_block, sparse_kv_block)
            if config is None:
                continue
        if config not in chosen:
            chosen.append(config)
    return chosen


def fewer_stages_to_fit(config, estimate, limit: int):
    """``config`` with its pipeline made shallower (down to one stage) until ``estimate``
    of it fits ``limit`` bytes of shared memory."""
    while config.num_stages > 1 and estimate(config) > limit:
        config = replace(config, num_stages=config.num_stages - 1)
    return config


def configs_summary(configs: Sequence[ForwardConfig]) -> str:
    """``BMxBN/wW/sS`` per config, for logs and error messages."""
    return ", ".join(f"{c.block_m}x{c.block_n}/w{c.num_warps}/s{c.num_stages}{'/tma' if c.tma else ''}"
                     for c in configs)


# ---------------------------------------------------------------------------------------
# The backward kernel
# ---------------------------------------------------------------------------------------

_BACKWARD_OPTION_FIELDS = {
    "BLOCK_M1": "block_m1",
    "BLOCK_N1": "block_n1",
    "BLOCK_M2": "block_m2",
    "BLOCK_N2": "block_n2",
    "num_warps": "num_warps",
    "num_stages": "num_stages",
}


def default_backward_config(capability: Tuple[int, int], dtype: torch.dtype, qk_head_dim: int,
                            v_head_dim: int) -> BackwardConfig:
    """One good backward config for this GPU, dtype and head dims (the table row's).

    The dK/dV programs keep k, v and float32 dk, dv resident, so their key tile (BLOCK_N1)
    is the larger one and the query step (BLOCK_M1) small; dQ programs mirror that."""
    return table_row(capability, dtype, qk_head_dim, v_head_dim).backward


def estimated_backward_shared_memory(config: BackwardConfig, dtype: torch.dtype,
                                     qk_head_dim: int, v_head_dim: int,
                                     gathered_bytes: int = 0) -> int:
    """Shared memory of the staged loads, roughly: the larger of the two programs' needs,
    plus the mods' staged gathers (``staged_gathers``)."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    dqk, dv = padded_head_dim(qk_head_dim), padded_head_dim(v_head_dim)
    stages = max(1, config.num_stages)
    dkdv = config.block_n1 * (dqk + dv) + stages * config.block_m1 * (dqk + dv)
    dq = config.block_m2 * (dqk + dv) + stages * config.block_n2 * (dqk + dv)
    tile_scores = max(config.block_m1 * config.block_n1, config.block_m2 * config.block_n2)
    return max(dkdv, dq) * itemsize + staged_gathers(tile_scores, config.num_stages, gathered_bytes)


def _backward_tile_fits(config: BackwardConfig, sparse_q_block: int, sparse_kv_block: int) -> bool:
    tiles = ((config.block_m1, sparse_q_block), (config.block_n1, sparse_kv_block),
             (config.block_m2, sparse_q_block), (config.block_n2, sparse_kv_block))
    return all(_tile_walks(tile, sparse) for tile, sparse in tiles)


def _shrink_backward_to_fit(config: BackwardConfig, sparse_q_block: int,
                            sparse_kv_block: int) -> Optional[BackwardConfig]:
    shrunk = replace(config, block_m1=_halved_to_divide(config.block_m1, sparse_q_block),
                     block_n1=_halved_to_divide(config.block_n1, sparse_kv_block),
                     block_m2=_halved_to_divide(config.block_m2, sparse_q_block),
                     block_n2=_halved_to_divide(config.block_n2, sparse_kv_block))
    return shrunk if _backward_tile_fits(shrunk, sparse_q_block, sparse_kv_block) else None


def select_backward_configs(capability: Tuple[int, int], dtype: torch.dtype, qk_head_dim: int,
                            v_head_dim: int, sparse_q_block: int, sparse_kv_block: int,
                            kernel_options: Mapping, max_autotune: bool,
                            gathered_bytes: int = 0) -> list:
    """The backward configs to compile; the rules of ``select_forward_configs`` with the
    options ``BLOCK_M1``, ``BLOCK_N1``, ``BLOCK_M2``, ``BLOCK_N2``, ``num_warps`` and
    ``num_stages`` (each also with a ``bwd_`` prefix that takes precedence)."""
    fixed = tile_options(kernel_options, _BACKWARD_OPTION_FIELDS, prefix=BACKWARD)
    _check_user_tiles(fixed, _BACKWARD_OPTION_FIELDS, sparse_q_block, sparse_kv_block,
                      "backward tile")
    limit = shared_memory_limit(capability)

    def estimate(config):
        return estimated_backward_shared_memory(config, dtype, qk_head_dim, v_head_dim, gathered_bytes)

    default = replace(default_backward_config(capability, dtype, qk_head_dim, v_head_dim), **fixed)
    if "num_stages" not in fixed:
        default = fewer_stages_to_fit(default, estimate, limit)
    candidates = [default]
    if max_autotune:
        candidates += [replace(c, **fixed) for c in generation_of(capability).backward_autotune
                       if estimate(c) <= limit]
    return walkable_configs(candidates, _backward_tile_fits, _shrink_backward_to_fit,
                            sparse_q_block, sparse_kv_block)


# ---------------------------------------------------------------------------------------
# The short-query (decode) kernel
# ---------------------------------------------------------------------------------------
# Its launch is a ForwardConfig whose block_m is the packed rows (a GQA group's heads x the
# query tokens, padded to a power of 2): only BLOCK_N, num_warps and num_stages are the
# user's to set (fwd_ prefix first). The kernel streams K/V once, so the tile is chosen for
# bandwidth, not reuse: 64 keys per step (32 past head dim 128), a three-deep pipeline.

# Queries this long or shorter take the decode kernel (the forward's smallest query tile).
DECODE_MAX_Q_LEN = 64
# Packed rows per program at most: the accumulator is rows x head dim float32 registers.
DECODE_MAX_ROWS = 64
# Programs to launch per SM when splitting the KV sequence (several waves hide the tail).
DECODE_PROGRAMS_PER_SM = 4
DECODE_MAX_SPLITS = 128

_DECODE_OPTION_FIELDS = {
    "BLOCK_N": "block_n",
    "num_warps": "num_warps",
    "num_stages": "num_stages",
}


def decode_heads_per_program(group: int, q_len: int, mask_heads_broadcast: bool) -> int:
    """How many query heads of one GQA group a decode program packs into its rows: the
    largest divisor of ``group`` whose heads x ``q_len`` rows fit ``DECODE_MAX_ROWS`` (a
    divisor, so a program never straddles two KV heads); 1 when the block mask differs
    per head (the packed rows must share one block-mask row)."""
    if not mask_heads_broadcast:
        return 1
    return max(h for h in range(1, group + 1)
               if group % h == 0 and (h * q_len <= DECODE_MAX_ROWS or h == 1))


def decode_rows(heads_per_program: int, q_len: int) -> int:
    """The packed rows as the tile holds them: a power of 2 of at least 16 (tl.dot)."""
    return padded_head_dim(heads_per_program * q_len)


def select_decode_config(capability: Tuple[int, int], dtype: torch.dtype, qk_head_dim: int,
                         v_head_dim: int, rows: int, sparse_kv_block: int,
                         kernel_options: Mapping, gathered_bytes: int = 0) -> Optional[ForwardConfig]:
    """The decode kernel's launch, or None when no key tile of at least 16 divides the
    block mask's KV_BLOCK_SIZE. A user's BLOCK_N must walk the block mask (ValueError)."""
    fixed = tile_options(kernel_options, _DECODE_OPTION_FIELDS)
    _check_user_tiles(fixed, _DECODE_OPTION_FIELDS, sparse_kv_block, sparse_kv_block,
                      "decode key tile")
    widest = max(padded_head_dim(qk_head_dim), padded_head_dim(v_head_dim))
    block_n = _halved_to_divide(64 if widest <= 128 else 32, sparse_kv_block)
    num_warps = 4 if rows * padded_head_dim(v_head_dim) <= 64 * 128 else 8
    config = replace(ForwardConfig(rows, block_n, num_warps, 3), **fixed)
    if "num_stages" not in fixed:
        config = fewer_stages_to_fit(
            config, lambda c: estimated_shared_memory(c, dtype, qk_head_dim, v_head_dim, gathered_bytes),
            shared_memory_limit(capability))
    return config if _tile_walks(config.block_n, sparse_kv_block) else None


def decode_splits(num_sms: int, programs: int, kv_blocks: Optional[int]) -> int:
    """Into how many programs each (batch, head group)'s KV blocks are split: enough for
    ``DECODE_PROGRAMS_PER_SM`` programs per SM over ``programs`` (batch x head groups),
    never more than the KV blocks when their number is known at compile time (a growing
    cache is not: its splits then run partly empty), at most ``DECODE_MAX_SPLITS``."""
    splits = -(-DECODE_PROGRAMS_PER_SM * num_sms // max(1, programs))
    if kv_blocks is not None:
        splits = min(splits, kv_blocks)
    return max(1, min(splits, DECODE_MAX_SPLITS))
