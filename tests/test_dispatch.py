"""The dispatch seam (lowering/dispatch.py) and the kernel-options reader
(lowering/options.py): which kernel serves a call, what BACKEND does, and that every
FlexKernelOptions key is read or declared ignored."""
import logging

import pytest
import torch

from inductor_flex import FlexKernelOptions, flex_attention
from inductor_flex.lowering import dispatch
from inductor_flex.lowering.options import BACKWARD, FORWARD, KEYS, PassOptions


def _qkv(requires_grad=False):
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(1, 2, 64, 16, generator=gen).requires_grad_(requires_grad) for _ in range(3)]


def test_every_declared_key_is_read_or_declared_ignored():
    declared = set()
    for key in FlexKernelOptions.__annotations__:
        upper = key.upper()
        for prefix in ("FWD_", "BWD_"):
            upper = upper[len(prefix):] if upper.startswith(prefix) else upper
        declared.add(upper)
    assert declared == set(KEYS)


def test_a_pass_reads_its_prefix_first_and_ignores_the_other():
    options = {"use_tma": False, "FWD_USE_TMA": True, "bwd_early_dp": True, "PRESCALE_QK": None}
    forward, backward = PassOptions(options, FORWARD), PassOptions(options, BACKWARD)
    assert forward.get("USE_TMA") is True and backward.get("USE_TMA") is False
    assert forward.get("EARLY_DP") is None and backward.flag("EARLY_DP")
    assert forward.flag("PRESCALE_QK", True)  # an explicit None is unset: the default holds
    assert forward.backend() == "AUTO" and PassOptions({"backend": "TRITON"}, FORWARD).backend() == "TRITON"
    assert PassOptions({"BACKEND": "AUTO", "BWD_BACKEND": "TRITON"}, BACKWARD).backend() == "TRITON"


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_bad_backend_values_raise_before_any_kernel(compiled):
    fn = torch.compile(flex_attention) if compiled else flex_attention
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="BACKEND='CUTLASS' is not one of"):
        fn(q, k, v, kernel_options={"BACKEND": "CUTLASS"})
    with pytest.raises(RuntimeError, match="BACKEND and FORCE_USE_FLEX_ATTENTION cannot be combined"):
        fn(q, k, v, kernel_options={"BACKEND": "TRITON", "FORCE_USE_FLEX_ATTENTION": True})
    # As PyTorch: values are case-sensitive; the pass-prefixed spellings are checked too.
    with pytest.raises(ValueError, match="BACKEND='triton' is not one of"):
        fn(q, k, v, kernel_options={"BACKEND": "triton"})
    with pytest.raises(ValueError, match="FWD_BACKEND='CUTLASS' is not one of"):
        fn(q, k, v, kernel_options={"fwd_BACKEND": "CUTLASS"})
    fn(q, k, v, kernel_options={"BACKEND": None})  # None is unset, as for every option


@pytest.mark.parametrize("backend,why", [
    ("TRITON", "fused Triton forward: compiles for cuda, not cpu"),
    ("TRITON_DECODE", "split-KV Triton decode: compiles for cuda, not cpu"),
    ("FLASH", "no kernel of that family exists here"),
])
def test_an_explicit_backend_that_cannot_serve_raises(backend, why):
    torch._dynamo.reset()
    q, k, v = _qkv()
    with pytest.raises(RuntimeError, match=f"BACKEND='{backend}' cannot serve this call: {why}"):
        torch.compile(flex_attention)(q, k, v, kernel_options={"BACKEND": backend})


def test_auto_serves_through_the_extern_call_on_cpu():
    torch._dynamo.reset()
    q, k, v = _qkv(requires_grad=True)
    out = torch.compile(flex_attention)(q, k, v, kernel_options={"BACKEND": "AUTO"})
    out.sum().backward()
    q2, k2, v2 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = flex_attention(q2, k2, v2)
    ref.sum().backward()
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(q.grad.double(), q2.grad, atol=1e-5, rtol=1e-5)


class _Scripted(dispatch.Candidate):
    """A candidate whose lowering is a Python callable (the real ones name a module)."""

    def lower(self, *args, **kwargs):
        return self.lowering(*args, **kwargs)


def _declines(*args, **kwargs):
    raise dispatch.Declined("tile does not fit")


class _Node:
    def get_device(self):
        return torch.device("cuda")


def test_a_declined_candidate_logs_its_reason_and_the_next_serves(caplog):
    candidates = (_Scripted("first", _declines, ("AUTO", "TRITON"), ("cuda",)),
                  _Scripted("second", lambda *a, **k: "served", ("AUTO",)))
    with caplog.at_level(logging.DEBUG, logger="inductor_flex"):
        got = dispatch.dispatch(candidates, PassOptions({}, FORWARD), "cuda", (_Node(),), {})
    assert got == "served"
    assert "first declined: tile does not fit" in caplog.text
    with pytest.raises(RuntimeError, match="BACKEND='TRITON' cannot serve this call: first: tile does not fit"):
        dispatch.dispatch(candidates, PassOptions({"BACKEND": "TRITON"}, FORWARD), "cuda", (_Node(),), {})


def test_force_use_flex_attention_skips_the_short_query_kernel():
    candidates = (_Scripted("decode", lambda *a, **k: "decode", ("AUTO", "TRITON_DECODE"), short_query=True),
                  _Scripted("flex", lambda *a, **k: "flex", ("AUTO", "TRITON")))
    assert dispatch.dispatch(candidates, PassOptions({}, FORWARD), "cuda", (), {}) == "decode"
    forced = PassOptions({"FORCE_USE_FLEX_ATTENTION": True}, FORWARD)
    assert dispatch.dispatch(candidates, forced, "cuda", (), {}) == "flex"


def test_the_real_lists_end_with_a_candidate_for_every_device():
    for candidates in (dispatch.FORWARD, dispatch.BACKWARD):
        last = candidates[-1]
        assert last.devices == () and "AUTO" in last.backends and not last.short_query
