"""No Inductor warnings about our operators in normal compiled use.

Inductor's FakeTensorUpdater warns "Please add support for subgraph args to function
inductor_flex_attention!" (and ``_backward``) for operators whose subgraph arguments it does
not know; lowering/fake_tensor_updates.py teaches it ours. These tests fail if the warning
comes back, and check that the rule names the arguments the subgraphs are really called with.
"""
import warnings

import torch
import torch._dynamo
from torch._inductor import fx_utils

import inductor_flex
from inductor_flex import create_block_mask, flex_attention
from inductor_flex.lowering import fake_tensor_updates

inductor_flex.lowering.register()  # idempotent; the package import may already do it


def _compiled_forward_backward_on_cpu():
    torch._dynamo.reset()
    generator = torch.Generator().manual_seed(0)
    query, key, value = (torch.randn(1, 2, 64, 16, generator=generator, requires_grad=True)
                         for _ in range(3))
    bias = torch.randn(64, generator=generator, requires_grad=True)
    limits = torch.full((1,), 40)

    def biased(score, b, h, q_idx, kv_idx):  # a captured buffer with a gradient
        return score + bias[kv_idx]

    def causal_below_limit(b, h, q_idx, kv_idx):  # a captured mask buffer
        return (kv_idx <= q_idx) & (kv_idx < limits[b])

    block_mask = create_block_mask(causal_below_limit, 1, None, 64, 64, device="cpu")
    out = torch.compile(flex_attention)(query, key, value, score_mod=biased, block_mask=block_mask)
    out.sum().backward()
    torch._dynamo.reset()
    return out, bias.grad


def test_no_subgraph_args_warning_in_compiled_forward_and_backward():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out, bias_grad = _compiled_forward_backward_on_cpu()
    assert torch.isfinite(out).all() and bias_grad is not None
    subgraph_args = [str(w.message) for w in caught if "subgraph args" in str(w.message)]
    assert subgraph_args == []


def test_rule_is_installed_in_front_of_inductors():
    rule = fx_utils._extract_subgraphs_and_args
    assert getattr(rule, "knows_inductor_flex", False)
    fake_tensor_updates.install()  # idempotent: not wrapped twice
    assert fx_utils._extract_subgraphs_and_args is rule
    assert not getattr(rule.__wrapped__, "knows_inductor_flex", False)


def test_rule_names_the_arguments_each_subgraph_is_called_with():
    """Every (subgraph, args) the rule yields for a post-grad graph matches the subgraph's
    placeholders one for one: same count, same dtypes and shapes."""
    seen = []
    inductor_rule = fx_utils._extract_subgraphs_and_args

    def recording_rule(node, valid_subgraphs, *args, **kwargs):
        for subgraph, subgraph_args in inductor_rule(node, valid_subgraphs, *args, **kwargs):
            if node.target in (inductor_flex.inductor_flex_attention,
                               inductor_flex.inductor_flex_attention_backward):
                seen.append((subgraph, subgraph_args))
            yield subgraph, subgraph_args

    fx_utils._extract_subgraphs_and_args = recording_rule
    try:
        _compiled_forward_backward_on_cpu()
    finally:
        fx_utils._extract_subgraphs_and_args = inductor_rule
    assert len(seen) >= 5  # forward: score and mask; backward: score, joint and mask
    for subgraph, subgraph_args in seen:
        assert subgraph_args is not None
        placeholders = fake_tensor_updates._placeholder_values(subgraph)
        assert len(subgraph_args) == len(placeholders)
        for arg, placeholder in zip(subgraph_args, placeholders):
            assert (arg.dtype, tuple(arg.shape)) == (placeholder.dtype, tuple(placeholder.shape))
