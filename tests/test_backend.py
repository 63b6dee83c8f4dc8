"""The "inductor_flex" torch.compile backend (inductor_flex/backend.py).

Registration by name (entry point and torch._dynamo.list_backends), how mode / options
combine with the backend's own Inductor settings, and numerics of Inductor-compiled
attention on the CPU (the extern lowering) against eager and a float64 reference.
"""
from importlib.metadata import entry_points

import pytest
import torch
import torch._dynamo
import torch._dynamo.testing
import torch._inductor.compile_fx

from inductor_flex import create_block_mask, flex_attention
from inductor_flex.backend import ATTENTION_CONFIG, inductor_flex_backend
from test_dynamo import GraphRecorder, flex_nodes, make_qkv, reference_attention

M, BLOCK = 24, 8


pytestmark = pytest.mark.usefixtures("fresh_dynamo")


def causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def _tiny_graph():
    return torch.fx.symbolic_trace(lambda x: torch.sin(x) + 1), [torch.randn(4)]


# ---------------------------------------------------------------------------------------
# registration
# ---------------------------------------------------------------------------------------

def test_entry_point_names_the_backend_function():
    (entry,) = [e for e in entry_points(group="torch_dynamo_backends") if e.name == "inductor_flex"]
    assert entry.value == "inductor_flex.backend:inductor_flex_backend"
    assert entry.load() is inductor_flex_backend


def test_dynamo_finds_the_backend_by_name():
    assert "inductor_flex" in torch._dynamo.list_backends()
    assert torch._dynamo.lookup_backend("inductor_flex") is inductor_flex_backend


# ---------------------------------------------------------------------------------------
# options
# ---------------------------------------------------------------------------------------

def test_attention_config_names_real_inductor_options():
    known = torch._inductor.config.get_config_copy()
    assert set(ATTENTION_CONFIG) <= set(known)


def test_mode_and_options_are_applied_after_the_attention_config(monkeypatch):
    seen = {}

    def fake_compile_fx(gm, example_inputs, config_patches=None, **kwargs):
        seen.update(config_patches)
        return gm.forward

    monkeypatch.setattr(torch._inductor.compile_fx, "compile_fx", fake_compile_fx)
    gm, inputs = _tiny_graph()

    inductor_flex_backend(gm, inputs)
    assert seen == ATTENTION_CONFIG

    seen.clear()
    inductor_flex_backend(gm, inputs, mode="max-autotune-no-cudagraphs",
                          options={"epilogue_fusion": False, "max_autotune": False})
    expected = dict(ATTENTION_CONFIG)
    expected.update(torch._inductor.list_mode_options("max-autotune-no-cudagraphs"))
    expected.update({"epilogue_fusion": False, "max_autotune": False})
    assert seen == expected
    assert seen["coordinate_descent_tuning"] is True  # from the mode
    assert seen["epilogue_fusion"] is False  # the caller's option wins


def test_bad_mode_or_option_is_a_value_error():
    gm, inputs = _tiny_graph()
    with pytest.raises(ValueError, match="unknown Inductor option.*no_such_option"):
        inductor_flex_backend(gm, inputs, options={"no_such_option": True})
    with pytest.raises(ValueError, match="unknown mode 'fastest'"):
        inductor_flex_backend(gm, inputs, mode="fastest")
    with pytest.raises(ValueError, match="options must be a dict"):
        inductor_flex_backend(gm, inputs, options=[("epilogue_fusion", True)])


def test_options_given_to_torch_compile_reach_the_backend(monkeypatch):
    seen = {}

    def fake_compile_fx(gm, example_inputs, config_patches=None, **kwargs):
        seen.update(config_patches)
        return gm.forward

    monkeypatch.setattr(torch._inductor.compile_fx, "compile_fx", fake_compile_fx)
    compiled = torch.compile(lambda x: x.cos() * 2, backend="inductor_flex",
                             options={"epilogue_fusion": False})
    x = torch.randn(5)
    torch.testing.assert_close(compiled(x), x.cos() * 2)
    assert seen["epilogue_fusion"] is False and seen["prologue_fusion"] is True


# ---------------------------------------------------------------------------------------
# numerics through Inductor on the CPU
# ---------------------------------------------------------------------------------------

def test_compiled_by_name_matches_eager_and_reference():
    bias = torch.randn(2, M)
    block_mask = create_block_mask(causal, None, None, M, M, device="cpu", BLOCK_SIZE=BLOCK)

    def score_mod(score, b, h, q_idx, kv_idx):
        return score + bias[b][q_idx] - 0.1 * (q_idx - kv_idx)

    def fn(q, k, v):
        return flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask,
                              return_lse=True)

    q, k, v = make_qkv(batch=2, heads=3, q_len=M, kv_len=M)
    counter = torch._dynamo.testing.CompileCounterWithBackend("inductor_flex")
    out, lse = torch.compile(fn, backend=counter, fullgraph=True)(q, k, v)
    assert counter.frame_count == 1
    eager_out, eager_lse = fn(q, k, v)
    torch.testing.assert_close(out, eager_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, eager_lse, atol=1e-5, rtol=1e-5)
    expected_out, expected_lse = reference_attention(q, k, v, score_mod, causal)
    torch.testing.assert_close(out.double(), expected_out, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(lse.double(), expected_lse, atol=2e-5, rtol=2e-5)


def test_model_with_attention_compiles_by_name_forward_and_backward():
    class Block(torch.nn.Module):
        def __init__(self, dim=16, heads=2):
            super().__init__()
            self.heads = heads
            self.qkv = torch.nn.Linear(dim, 3 * dim)
            self.proj = torch.nn.Linear(dim, dim)
            self.head_bias = torch.nn.Parameter(torch.randn(heads) * 0.1)

        def forward(self, x, block_mask):
            batch, seq, dim = x.shape
            q, k, v = self.qkv(x).view(batch, seq, 3, self.heads, dim // self.heads) \
                .permute(2, 0, 3, 1, 4)

            def score_mod(score, b, h, q_idx, kv_idx):
                return score + self.head_bias[h]

            attn = flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask)
            return x + self.proj(attn.transpose(1, 2).reshape(batch, seq, dim))

    torch.manual_seed(0)
    model = Block()
    block_mask = create_block_mask(causal, None, None, M, M, device="cpu", BLOCK_SIZE=BLOCK)
    x = torch.randn(2, M, 16, requires_grad=True)
    compiled = torch.compile(model, backend="inductor_flex", fullgraph=True)
    out = compiled(x, block_mask)
    expected = model(x, block_mask)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)

    params = [x, model.head_bias, model.qkv.weight]
    grads = torch.autograd.grad(out.square().sum(), params)
    expected_grads = torch.autograd.grad(expected.square().sum(), params)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_dynamic_shapes_through_the_backend():
    def fn(q, k, v, block_mask):
        return flex_attention(q, k, v, block_mask=block_mask)

    counter = torch._dynamo.testing.CompileCounterWithBackend("inductor_flex")
    compiled = torch.compile(fn, backend=counter, dynamic=True)
    for batch, heads, seq in [(2, 3, 40), (3, 4, 56)]:
        q, k, v = make_qkv(batch, heads, seq, seq)
        block_mask = create_block_mask(causal, None, None, seq, seq, device="cpu",
                                       BLOCK_SIZE=BLOCK)
        out = compiled(q, k, v, block_mask)
        expected, _ = reference_attention(q, k, v, None, causal)
        torch.testing.assert_close(out.double(), expected, atol=2e-5, rtol=2e-5)
    assert counter.frame_count == 1


def test_plain_inductor_also_compiles_the_operator_once_imported():
    # Importing inductor_flex registers the lowering, so backend="inductor" works too;
    # the Dynamo graph it receives holds the captured operator.
    recorder = GraphRecorder("inductor")
    block_mask = create_block_mask(causal, None, None, M, M, device="cpu", BLOCK_SIZE=BLOCK)

    def fn(q, k, v):
        return flex_attention(q, k, v, block_mask=block_mask)

    q, k, v = make_qkv(batch=2, heads=3, q_len=M, kv_len=M)
    out = torch.compile(fn, backend=recorder, fullgraph=True)(q, k, v)
    assert len(flex_nodes(recorder.graphs[0])) == 1
    expected, _ = reference_attention(q, k, v, None, causal)
    torch.testing.assert_close(out.double(), expected, atol=2e-5, rtol=2e-5)
