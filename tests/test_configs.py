"""Tile-config selection for the forward and backward kernels (lowering/configs.py): the
per-generation tables, the walker, the fallback for a GPU missing from the tables, and the
user's tile options. Plain Python: runs without a GPU."""
import logging

import pytest
import torch

from inductor_flex import _compat
from inductor_flex.lowering import common
from inductor_flex.lowering.configs import (
    FALLBACK,
    GENERATIONS,
    BackwardConfig,
    default_backward_config,
    estimated_backward_shared_memory,
    generation_of,
    select_backward_configs,
    autotune_forward_configs,
    default_forward_config,
    estimated_shared_memory,
    padded_head_dim,
    select_forward_configs,
    shared_memory_limit,
    tile_fits,
    tma_loads_allowed,
)

HOPPER, AMPERE, ADA = (9, 0), (8, 0), (8, 9)
DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def test_padded_head_dim():
    assert [padded_head_dim(d) for d in (1, 16, 17, 24, 64, 94, 121, 128, 256)] == \
        [16, 16, 32, 32, 64, 128, 128, 128, 256]


@pytest.mark.parametrize("capability", [HOPPER, AMPERE, ADA])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("dims", [(16, 16), (64, 64), (64, 32), (94, 94), (128, 128), (256, 256)])
def test_default_config_fits_the_gpu(capability, dtype, dims):
    config = default_forward_config(capability, dtype, *dims)
    assert tile_fits(config, 128, 128)
    assert config.num_warps in (4, 8) and 1 <= config.num_stages <= 4
    assert estimated_shared_memory(config, dtype, *dims) <= shared_memory_limit(capability)


def test_hopper_half_precision_uses_wide_tiles_and_tma():
    masked = default_forward_config(HOPPER, torch.bfloat16, 128, 128)
    assert (masked.block_m, masked.block_n, masked.num_stages, masked.tma) == (128, 64, 2, True)
    # No masked loop at D=128: 64x128, one stage (measured faster on H100, docs/measurements.md).
    unmasked = default_forward_config(HOPPER, torch.bfloat16, 128, 128, mask_free=True)
    assert (unmasked.block_m, unmasked.block_n, unmasked.num_stages, unmasked.tma) == (64, 128, 1, True)
    assert default_forward_config(HOPPER, torch.bfloat16, 64, 64, mask_free=True) == \
        default_forward_config(HOPPER, torch.bfloat16, 64, 64)
    # float32 and pre-Hopper GPUs never ask for TMA.
    assert not default_forward_config(HOPPER, torch.float32, 128, 128).tma
    assert not any(c.tma for c in autotune_forward_configs(AMPERE, torch.bfloat16, 128, 128)
                   if c == default_forward_config(AMPERE, torch.bfloat16, 128, 128))


@pytest.mark.parametrize("capability", [HOPPER, AMPERE, ADA])
def test_autotune_set_starts_with_default_and_fits(capability):
    configs = autotune_forward_configs(capability, torch.bfloat16, 128, 128)
    assert configs[0] == default_forward_config(capability, torch.bfloat16, 128, 128)
    assert len(set(configs)) == len(configs) > 1
    for config in configs:
        assert estimated_shared_memory(config, torch.bfloat16, 128, 128) <= shared_memory_limit(capability)


def test_max_autotune_widens_the_set_and_skips_tiles_that_do_not_divide():
    plain = select_forward_configs(HOPPER, torch.bfloat16, 64, 64, 128, 128, {}, max_autotune=False)
    assert plain == [default_forward_config(HOPPER, torch.bfloat16, 64, 64)]
    wide = select_forward_configs(HOPPER, torch.bfloat16, 64, 64, 128, 128, {}, max_autotune=True)
    assert len(wide) > 3 and wide[0] == plain[0]
    # A 64-key sparse block admits no BLOCK_N=128 candidate; the default shrinks to fit.
    small = select_forward_configs(HOPPER, torch.bfloat16, 64, 64, 128, 64, {}, max_autotune=True)
    assert small and all(64 % c.block_n == 0 for c in small)
    assert small[0].block_n == 64


def test_kernel_options_fix_launch_fields():
    options = {"BLOCK_M": 32, "FWD_BLOCK_M": 64, "block_n": 32, "NUM_WARPS": 4,
               "fwd_num_stages": 2, "BWD_BLOCK_M1": 16}
    configs = select_forward_configs(HOPPER, torch.bfloat16, 64, 64, 128, 128, options,
                                     max_autotune=True)
    # Every launch field is fixed; only the TMA preference may still vary between choices.
    assert {(c.block_m, c.block_n, c.num_warps, c.num_stages) for c in configs} == {(64, 32, 4, 2)}


@pytest.mark.parametrize("options,message", [
    ({"BLOCK_N": 96}, "BLOCK_N=96"),
    ({"fwd_BLOCK_M": 256}, "BLOCK_M=256"),
    ({"BLOCK_M": 8}, "BLOCK_M=8"),
    ({"num_warps": 0}, "(?i)num_warps"),
    ({"BLOCK_N": "64"}, "BLOCK_N"),
])
def test_bad_tile_options_raise(options, message):
    with pytest.raises(ValueError, match=message):
        select_forward_configs(HOPPER, torch.bfloat16, 64, 64, 128, 128, options, max_autotune=False)


def test_small_or_odd_sparse_blocks():
    # 96 = 3 * 32: the tile shrinks to 32; blocks under 16 leave nothing (extern fallback).
    odd = select_forward_configs(HOPPER, torch.bfloat16, 64, 64, 96, 96, {}, max_autotune=False)
    assert [(c.block_m, c.block_n) for c in odd] == [(32, 32)]
    assert odd[0].num_warps == 4
    assert select_forward_configs(HOPPER, torch.bfloat16, 64, 64, 8, 8, {}, max_autotune=False) == []


# ---------------------------------------------------------------------------------------
# Backward
# ---------------------------------------------------------------------------------------

def _backward_tiles(config):
    return (config.block_m1, config.block_n1, config.block_m2, config.block_n2)


@pytest.mark.parametrize("capability", [HOPPER, AMPERE, ADA])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("dims", [(16, 16), (64, 64), (64, 32), (94, 94), (128, 128), (256, 256)])
def test_default_backward_config_fits_the_gpu(capability, dtype, dims):
    config = default_backward_config(capability, dtype, *dims)
    assert all(128 % t == 0 and t >= 16 for t in _backward_tiles(config))
    assert estimated_backward_shared_memory(config, dtype, *dims) <= shared_memory_limit(capability)


def test_backward_defaults_on_hopper():
    # The H100 sweep's winners (docs/kernels.md, Configs; numbers in docs/measurements.md).
    assert default_backward_config(HOPPER, torch.bfloat16, 64, 64) == BackwardConfig(
        64, 64, 64, 64, 4, 3, early_dp=True)
    assert default_backward_config(HOPPER, torch.bfloat16, 128, 128) == BackwardConfig(
        64, 64, 64, 64, 4, 2)
    # Measured on H100 only: the A100 keeps the plain order and the two-warpgroup tile.
    assert not default_backward_config(AMPERE, torch.bfloat16, 64, 64).early_dp
    assert default_backward_config(AMPERE, torch.bfloat16, 128, 128) == BackwardConfig(64, 128, 128, 64, 8, 2)


def test_backward_options_take_the_bwd_prefix():
    options = {"BLOCK_M1": 16, "BWD_BLOCK_M1": 32, "bwd_BLOCK_N2": 32, "NUM_WARPS": 4,
               "bwd_num_stages": 1, "FWD_BLOCK_M": 16, "BLOCK_M": 16}
    configs = select_backward_configs(HOPPER, torch.bfloat16, 64, 64, 128, 128, options,
                                      max_autotune=True)
    assert configs and all(c.block_m1 == 32 and c.block_n2 == 32 and c.num_warps == 4
                           and c.num_stages == 1 for c in configs)
    # forward-only options leave the backward alone
    plain = select_backward_configs(HOPPER, torch.bfloat16, 64, 64, 128, 128,
                                    {"FWD_BLOCK_M": 16, "BLOCK_M": 16}, max_autotune=False)
    assert plain == [default_backward_config(HOPPER, torch.bfloat16, 64, 64)]


@pytest.mark.parametrize("options,message", [
    ({"bwd_BLOCK_N1": 96}, "BLOCK_N1=96"),
    ({"BLOCK_M2": 256}, "BLOCK_M2=256"),
    ({"bwd_BLOCK_M1": 8}, "BLOCK_M1=8"),
    ({"bwd_num_warps": 0}, "(?i)bwd_num_warps"),
])
def test_bad_backward_tile_options_raise(options, message):
    with pytest.raises(ValueError, match=message):
        select_backward_configs(HOPPER, torch.bfloat16, 64, 64, 128, 128, options, max_autotune=False)


def test_backward_tiles_shrink_to_small_sparse_blocks():
    (config,) = select_backward_configs(HOPPER, torch.bfloat16, 128, 128, 32, 32, {},
                                        max_autotune=False)
    assert _backward_tiles(config) == (32, 32, 32, 32)
    assert select_backward_configs(HOPPER, torch.bfloat16, 64, 64, 8, 8, {}, max_autotune=False) == []


# Four float32 [S, S] tables read per score (16 bytes) made the old 64x128 two-stage D=128
# backward need 279 KB on an H100 (227 KB allowed) before the estimate counted them; the
# 64x64 default has room for 8 (32 bytes) at two stages, not for 9.
@pytest.mark.parametrize("gathered,stages", [(0, 2), (16, 2), (32, 2), (36, 1)])
def test_backward_default_sheds_stages_for_gathered_tables(gathered, stages):
    (config,) = select_backward_configs(HOPPER, torch.bfloat16, 128, 128, 128, 128, {},
                                        max_autotune=False, gathered_bytes=gathered)
    assert config.num_stages == stages
    assert estimated_backward_shared_memory(config, torch.bfloat16, 128, 128, gathered) \
        <= shared_memory_limit(HOPPER)


def test_forward_default_sheds_stages_for_gathered_tables():
    (plain,) = select_forward_configs(HOPPER, torch.bfloat16, 128, 128, 128, 128, {},
                                      max_autotune=False, gathered_bytes=16)
    assert plain.num_stages == 2  # 96 KB of tiles + 4 x 32 KB of tables fit
    (shallow,) = select_forward_configs(HOPPER, torch.bfloat16, 128, 128, 128, 128, {},
                                        max_autotune=False, gathered_bytes=24)
    assert shallow.num_stages == 1 and shallow.block_m == plain.block_m
    # Every max-autotune candidate fits as well.
    for config in select_forward_configs(HOPPER, torch.bfloat16, 128, 128, 128, 128, {},
                                         max_autotune=True, gathered_bytes=24):
        assert estimated_shared_memory(config, torch.bfloat16, 128, 128, 24) <= shared_memory_limit(HOPPER)


def test_user_num_stages_is_kept_with_gathered_tables():
    options = {"bwd_num_stages": 2}
    (config,) = select_backward_configs(HOPPER, torch.bfloat16, 128, 128, 128, 128, options,
                                        max_autotune=False, gathered_bytes=16)
    assert config.num_stages == 2
    (config,) = select_forward_configs(HOPPER, torch.bfloat16, 128, 128, 128, 128,
                                       {"num_stages": 2}, max_autotune=False, gathered_bytes=24)
    assert config.num_stages == 2


# ---------------------------------------------------------------------------------------
# The tables and the fallback
# ---------------------------------------------------------------------------------------

SERVED = [(7, 0), (7, 2), (7, 5), (8, 0), (8, 6), (8, 7), (8, 9), (9, 0), (10, 0), (10, 3),
          (12, 0), (12, 1)]
DIMS = [(16, 16), (64, 64), (64, 32), (94, 94), (128, 128), (128, 64), (256, 256)]


def test_every_served_capability_has_a_table():
    assert sorted(c for g in GENERATIONS for c in g.capabilities) == SERVED
    assert generation_of((9, 0)).name.startswith("Hopper")


@pytest.mark.parametrize("generation", GENERATIONS + (FALLBACK,), ids=lambda g: g.name)
def test_tables_are_well_formed(generation):
    for table in (generation.half, generation.float32):
        bounds = [row.max_head_dim for row in table]
        assert bounds == sorted(bounds) and bounds[-1] == common.MAX_HEAD_DIM
        for row in table:
            configs = (row.forward, row.forward_mask_free or row.forward)
            # TMA is asked for only where the generation may use it.
            assert generation.tma_loads or not any(c.tma for c in configs)
            assert all(tile_fits(c, 128, 128) for c in configs)
    if generation is FALLBACK:
        assert not generation.tma_loads and not any(c.tma for c in generation.forward_autotune)


UNKNOWN = [(11, 0), (13, 0), (9, 4), (6, 1)]


@pytest.mark.parametrize("capability", UNKNOWN)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("dims", DIMS)
def test_unknown_gpu_gets_the_conservative_fallback(capability, dtype, dims):
    # Not Hopper's tiles (or TMA) for a GPU newer than the tables: the smallest tables.
    assert generation_of(capability) is FALLBACK
    assert shared_memory_limit(capability) == 48 * 1024 and not tma_loads_allowed(capability)
    for mask_free in (False, True):
        forward = default_forward_config(capability, dtype, *dims, mask_free=mask_free)
        assert forward == default_forward_config((7, 5), dtype, *dims, mask_free=mask_free)
        assert not forward.tma and forward.num_warps == 4
        configs = select_forward_configs(capability, dtype, *dims, 128, 128, {},
                                         max_autotune=True, mask_free=mask_free)
        assert configs and not any(c.tma for c in configs)
    backward = default_backward_config(capability, dtype, *dims)
    assert backward == default_backward_config((7, 5), dtype, *dims)
    assert not backward.early_dp and backward.num_warps == 4
    assert not any(c.early_dp for c in select_backward_configs(
        capability, dtype, *dims, 128, 128, {}, max_autotune=False))


def test_unknown_gpu_never_loads_through_the_tma(monkeypatch):
    # The gate both lowerings ask (the backward takes TMA from it, not from its config).
    monkeypatch.setattr(_compat, "triton_has_tensor_descriptors", lambda: True)
    assert common.tma_possible((9, 0), ()) and common.tma_possible((10, 0), ())
    assert not any(common.tma_possible(c, ()) for c in UNKNOWN + [(8, 0), (8, 9)])


def test_unknown_gpu_is_logged_once_at_debug_level(caplog):
    capability = (99, 1)  # no other test asks for it: its one log line is this test's
    with caplog.at_level(logging.DEBUG, logger="inductor_flex.lowering.configs"):
        select_forward_configs(capability, torch.bfloat16, 64, 64, 128, 128, {}, max_autotune=True)
        select_backward_configs(capability, torch.bfloat16, 64, 64, 128, 128, {}, max_autotune=True)
        default_forward_config((9, 0), torch.bfloat16, 64, 64)
    lines = [r for r in caplog.records if r.name == "inductor_flex.lowering.configs"]
    assert len(lines) == 1 and lines[0].levelno == logging.DEBUG
    assert "(99, 1)" in lines[0].getMessage() and "no TMA" in lines[0].getMessage()


# ---------------------------------------------------------------------------------------
# The decode kernel's launch (configs.decode_*)
# ---------------------------------------------------------------------------------------

def test_decode_packs_the_largest_group_divisor_that_fits():
    from inductor_flex.lowering.configs import decode_heads_per_program, decode_rows

    assert decode_heads_per_program(4, 1, True) == 4
    assert decode_heads_per_program(5, 4, True) == 5          # 20 rows, padded to 32
    assert decode_rows(5, 4) == 32 and decode_rows(4, 1) == 16
    assert decode_heads_per_program(5, 16, True) == 1         # 80 rows do not fit 64
    assert decode_heads_per_program(4, 16, True) == 4
    assert decode_heads_per_program(8, 16, True) == 4
    assert decode_heads_per_program(4, 64, True) == 1
    assert decode_heads_per_program(4, 1, False) == 1         # a block mask per head


def test_decode_splits_fill_the_sms():
    from inductor_flex.lowering.configs import decode_splits

    assert decode_splits(132, 64, 256) == 9      # B=8 x 8 KV heads, 32k keys
    assert decode_splits(132, 8, 1024) == 66     # B=1, 128k keys
    assert decode_splits(132, 512, 16) == 2      # B=64, 2k keys
    assert decode_splits(132, 8, 3) == 3         # never more splits than blocks
    assert decode_splits(132, 1, None) == 128    # unknown length: capped
    assert decode_splits(132, 10_000, 100) == 1


def test_decode_config_tile_and_user_options():
    from inductor_flex.lowering.configs import select_decode_config

    config = select_decode_config(HOPPER, torch.bfloat16, 128, 128, 16, 128, {})
    assert (config.block_m, config.block_n, config.num_warps, config.num_stages) == (16, 64, 4, 3)
    assert select_decode_config(HOPPER, torch.float32, 256, 256, 64, 128, {}).block_n == 32
    assert select_decode_config(HOPPER, torch.bfloat16, 64, 64, 16, 32, {}).block_n == 32
    assert select_decode_config(HOPPER, torch.bfloat16, 64, 64, 16, 8, {}) is None
    fixed = select_decode_config(HOPPER, torch.bfloat16, 64, 64, 16, 128,
                                 {"FWD_BLOCK_N": 128, "NUM_STAGES": 2})
    assert (fixed.block_n, fixed.num_stages) == (128, 2)
    with pytest.raises(ValueError, match="BLOCK_N=48: the decode key tile must be a power of 2"):
        select_decode_config(HOPPER, torch.bfloat16, 64, 64, 16, 128, {"BLOCK_N": 48})
