"""Tests of the fused CUDA kernels (lowering/, templates/): forward, backward, layouts.

They need a CUDA GPU: without one, every test that takes the ``device`` fixture is
skipped (the tile-config tests need none and live in tests/test_configs.py). The device
can be overridden with ``INDUCTOR_FLEX_GPU_TEST_DEVICE`` (default ``cuda``), e.g. to run
them through Triton's CPU interpreter while developing the templates.
"""
import os

import pytest
import torch

TEST_DEVICE = os.environ.get("INDUCTOR_FLEX_GPU_TEST_DEVICE", "cuda")


@pytest.fixture
def device():
    if TEST_DEVICE == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    return TEST_DEVICE


@pytest.fixture(autouse=True)
def _fresh_dynamo(fresh_dynamo):
    """Each test compiles from scratch, so recompile counts and generated code are its own."""


def pytest_configure(config):
    config.addinivalue_line("markers", "vendor: may be served by the vendor SDPA candidates")


@pytest.fixture(autouse=True)
def _fused_kernels_only(request, monkeypatch):
    """These tests check our fused kernels, and on Hopper the vendor SDPA candidates
    (lowering/vendor.py) would serve their full / causal cases: they are taken out of the
    dispatch lists except for tests marked ``vendor`` (tests/gpu/test_vendor_sdpa.py)."""
    from inductor_flex.lowering import dispatch, vendor

    if request.node.get_closest_marker("vendor") is not None:
        monkeypatch.setattr(vendor, "ENABLED", True)  # (the default; a switch for comparisons)
        return

    for name in ("FORWARD", "BACKWARD"):
        kept = tuple(c for c in getattr(dispatch, name) if not c.lowering.startswith("vendor."))
        monkeypatch.setattr(dispatch, name, kept)
