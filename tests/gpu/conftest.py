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
def _fresh_dynamo():
    """Each test compiles from scratch, so recompile counts and generated code are its own."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
