"""Bad input: each kind is rejected before any computation, with a ValueError /
RuntimeError (NotImplementedError for unsupported layouts, as PyTorch) whose message names
the argument; every input PyTorch accepts is computed. docs/guide.md's errors table lists
each case of BAD_INPUTS by name; PyTorch's own flex_attention is called only as a
reference for what it accepts (ACCEPTED_INPUTS).

Each case runs eagerly and inside a compiled function (Dynamo traces the checks; they fail
at trace time, before a kernel is built), on the CPU or on the device that
``INDUCTOR_FLEX_BAD_INPUT_DEVICE`` names.
"""
import math
import os

import pytest
import torch
import torch._dynamo
import torch.nn.attention.flex_attention as torch_flex

from inductor_flex import AuxRequest, create_block_mask, create_mask, flex_attention

# The GPU run: INDUCTOR_FLEX_BAD_INPUT_DEVICE=cuda (compiled cases then build CUDA kernels).
DEVICE = os.environ.get("INDUCTOR_FLEX_BAD_INPUT_DEVICE", "cpu")


def tensor(*shape, dtype=torch.float32, device=DEVICE):
    generator = torch.Generator().manual_seed(sum(shape) + len(shape))
    return torch.randn(*shape, generator=generator).to(dtype=dtype, device=device)


def qkv(batch=2, heads=4, length=64, dim=16):
    return [tensor(batch, heads, length, dim) for _ in range(3)]


def causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def mask(q_len=64, kv_len=64, B=None, H=None, device=DEVICE, mask_mod=causal):
    return create_block_mask(mask_mod, B, H, q_len, kv_len, device=device)


def attend(*args, **kwargs):
    return lambda: flex_attention(*args, **kwargs)


Q = tensor(2, 4, 64, 16)

# name -> (call, error type, message fragment). Built lazily: some cases build masks.
BAD_INPUTS = {
    "query_not_a_tensor": (lambda: attend([[1.0]], Q, Q), ValueError, "query must be a torch.Tensor"),
    "query_3d": (lambda: attend(tensor(4, 64, 16), Q, Q), NotImplementedError, "query.dim()=3"),
    "key_5d": (lambda: attend(Q, tensor(1, 2, 4, 64, 16), Q), NotImplementedError, "key.dim()=5"),
    "value_2d": (lambda: attend(Q, Q, tensor(64, 16)), NotImplementedError, "value.dim()=2"),
    "integer_dtype": (lambda: attend(*[t.long() for t in qkv()]), ValueError, "must be floating point"),
    "key_dtype_differs": (lambda: attend(Q, Q.double(), Q), ValueError, "key.dtype: torch.float64"),
    "value_dtype_differs": (lambda: attend(Q, Q, Q.half()), ValueError, "value.dtype: torch.float16"),
    "key_device_differs": (lambda: attend(Q, Q.to("meta"), Q), ValueError, "key.device: meta"),
    "head_dim_differs": (lambda: attend(Q, tensor(2, 4, 64, 8), tensor(2, 4, 64, 8)), ValueError,
                         "same embedding dimension"),
    "value_length_differs": (lambda: attend(Q, Q, tensor(2, 4, 32, 16)), ValueError, "value.shape=(2, 4, 32, 16)"),
    "value_heads_differ": (lambda: attend(Q, Q, tensor(2, 2, 64, 16), enable_gqa=True), ValueError,
                           "value.shape=(2, 2, 64, 16)"),
    "kv_batch_differs": (lambda: attend(Q, tensor(3, 4, 64, 16), tensor(3, 4, 64, 16)), ValueError, "Bkv=3"),
    "heads_differ_without_gqa": (lambda: attend(Q, tensor(2, 2, 64, 16), tensor(2, 2, 64, 16)), ValueError,
                                 "enable_gqa=True"),
    "gqa_heads_not_divisible": (lambda: attend(tensor(2, 3, 64, 16), *qkv(heads=2)[:2], enable_gqa=True),
                                ValueError, "multiple of kv heads"),
    "zero_heads": (lambda: attend(*qkv(heads=0)), ValueError, "at least one head"),
    "zero_heads_gqa": (lambda: attend(Q, *qkv(heads=0)[:2], enable_gqa=True), ValueError, "at least one head"),
    "zero_head_dim": (lambda: attend(*qkv(dim=0)), ValueError, "head dim E=0"),
    "nested_query": (lambda: attend(torch.nested.nested_tensor([tensor(4, 64, 16), tensor(4, 32, 16)]), Q, Q),
                     NotImplementedError, "nested tensors"),
    "block_mask_for_shorter_query": (lambda: attend(Q, Q, Q, block_mask=mask(32, 64)), ValueError,
                                     "block_mask was created for Q_LEN=32"),
    "block_mask_for_longer_sequences": (lambda: attend(Q, Q, Q, block_mask=mask(128, 128)), ValueError,
                                        "block_mask was created for Q_LEN=128 and KV_LEN=128"),
    "block_mask_batch_differs": (lambda: attend(Q, Q, Q, block_mask=mask(B=3)), ValueError,
                                 "block_mask has batch size 3"),
    "block_mask_heads_differ": (lambda: attend(Q, Q, Q, block_mask=mask(H=3)), ValueError, "and 3 heads"),
    "block_mask_device_differs": (lambda: attend(Q, Q, Q, block_mask=mask(device="meta")), RuntimeError,
                                  "same device"),
    "block_mask_a_tensor": (lambda: attend(Q, Q, Q, block_mask=torch.ones(64, 64, dtype=torch.bool)),
                            ValueError, "block_mask must be"),
    "score_mod_not_callable": (lambda: attend(Q, Q, Q, score_mod=3), ValueError, "score_mod must be callable"),
    "scale_a_string": (lambda: attend(Q, Q, Q, scale="0.5"), ValueError, "scale must be a number"),
    "scale_a_bool": (lambda: attend(Q, Q, Q, scale=True), ValueError, "scale must be a number"),
    "return_aux_a_dict": (lambda: attend(Q, Q, Q, return_aux={"lse": True}), ValueError,
                          "return_aux must be an AuxRequest"),
    "return_aux_a_bool": (lambda: attend(Q, Q, Q, return_aux=True), ValueError, "return_aux must be an AuxRequest"),
    "return_lse_with_return_aux": (lambda: attend(Q, Q, Q, return_lse=True, return_aux=AuxRequest(lse=True)),
                                   ValueError, "both return_lse and return_aux"),
    "kernel_options_a_list": (lambda: attend(Q, Q, Q, kernel_options=[("BLOCK_M", 64)]), ValueError,
                              "kernel_options must be a dict"),
    "kernel_options_internal_key": (lambda: attend(Q, Q, Q, kernel_options={"output_logsumexp": True}),
                                    ValueError, "kernel_options must not set"),
    "kernel_options_key_twice": (lambda: attend(Q, Q, Q, kernel_options={"BLOCK_M": 64, "block_m": 32}),
                                 ValueError, "sets BLOCK_M twice"),
    "mask_mod_returns_int": (lambda: attend(Q, Q, Q, block_mask=mask(mask_mod=lambda b, h, q, kv: (q >= kv).int())),
                             ValueError, "must return a bool tensor"),
    "mask_mod_not_callable": (lambda: attend(Q, Q, Q, block_mask=mask(mask_mod=3)), ValueError,
                              "mask_mod must be a callable"),
    "mask_mod_takes_five_arguments": (lambda: attend(Q, Q, Q, block_mask=mask(mask_mod=lambda s, b, h, q, kv: s)),
                                      ValueError, "looks like a score_mod"),
    "block_size_zero": (lambda: attend(Q, Q, Q, block_mask=create_block_mask(causal, None, None, 64, 64, DEVICE, 0)),
                        ValueError, "BLOCK_SIZE entries must be positive"),
}


def _raise(case):
    call, error, fragment = BAD_INPUTS[case]
    with pytest.raises(error, match=fragment.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        call()()


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_rejected_eager(case):
    _raise(case)


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_rejected_compiled(case):
    """The same checks run while Dynamo traces (the mask, where a case builds one, is made
    eagerly first, as a caller would); no kernel is built for a rejected input."""
    call, error, fragment = BAD_INPUTS[case]
    torch._dynamo.reset()
    try:
        thunk = call()
    except error as raised:  # the case fails while building its block mask: eager only
        assert fragment in str(raised)
        return
    compiled = torch.compile(lambda: thunk(), backend="inductor", fullgraph=False)
    with pytest.raises(Exception) as raised:
        compiled()
    # Dynamo may wrap the error; its text still carries ours.
    assert fragment in str(raised.value), str(raised.value)
    torch._dynamo.reset()


# Inputs PyTorch computes: we compute them too, to float64 reference accuracy.
ACCEPTED_INPUTS = {
    "scale_zero": dict(scale=0.0),
    "scale_negative": dict(scale=-1.5),
    "scale_an_int": dict(scale=1),
    "kernel_options_none": dict(kernel_options=None),
    "value_head_dim_differs": dict(value=tensor(2, 4, 64, 8)),
    "query_length_zero": dict(query=tensor(2, 4, 0, 16)),
    "batch_zero": dict(query=tensor(0, 4, 64, 16), key=tensor(0, 4, 64, 16), value=tensor(0, 4, 64, 16)),
    "gqa_heads_divisible": dict(key=tensor(2, 2, 64, 16), value=tensor(2, 2, 64, 16), enable_gqa=True),
}


@pytest.mark.parametrize("case", sorted(ACCEPTED_INPUTS))
def test_inputs_pytorch_accepts_are_computed(case):
    arguments = dict(query=Q, key=Q, value=Q)
    arguments.update(ACCEPTED_INPUTS[case])
    expected = torch_flex.flex_attention(**{k: v.double() if isinstance(v, torch.Tensor) else v
                                            for k, v in arguments.items()})
    torch.testing.assert_close(flex_attention(**arguments), expected.float())
    torch._dynamo.reset()
    compiled = torch.compile(flex_attention, backend="inductor")
    torch.testing.assert_close(compiled(**arguments), expected.float())
    torch._dynamo.reset()


def test_pytorch_rejects_a_non_boolean_mask_mod_too():
    """The reference for mask_mod_returns_int: PyTorch's create_block_mask refuses it."""
    with pytest.raises(AssertionError, match="torch.bool"):
        torch_flex.create_block_mask(lambda b, h, q, kv: (q >= kv).int(), None, None, 64, 64, device=DEVICE)


@pytest.mark.parametrize("result", [lambda q, kv: (q >= kv).int(), lambda q, kv: (q >= kv).float(),
                                    lambda q, kv: q - kv])
def test_mask_mod_returning_non_boolean_is_an_error_everywhere(result):
    """Nonzero no longer silently means keep: create_mask, create_block_mask and eager
    flex_attention (a BlockMask whose mask_mod was swapped afterwards) all refuse it."""
    def not_boolean(b, h, q_idx, kv_idx):
        return result(q_idx, kv_idx)

    with pytest.raises(ValueError, match="must return a bool tensor"):
        create_mask(not_boolean, None, None, 64, 64, device=DEVICE)
    with pytest.raises(ValueError, match="must return a bool tensor"):
        create_block_mask(not_boolean, None, None, 64, 64, device=DEVICE)
    block_mask = create_block_mask(causal, None, None, 64, 64, device=DEVICE, BLOCK_SIZE=16)
    block_mask.mask_mod = not_boolean
    with pytest.raises(ValueError, match="must return a bool tensor"):
        flex_attention(Q, Q, Q, block_mask=block_mask)


def test_eager_runs_each_mod_once_per_use():
    """A side-effecting mod (here a call counter) runs once per query block in the forward
    and in the backward, with grad mode on or off: deciding whether the score_mod captures a
    tensor that needs a gradient no longer calls it when it provably does not."""
    calls = {"score_mod": 0, "mask_mod": 0}

    def counted_score_mod(score, b, h, q_idx, kv_idx):
        calls["score_mod"] += 1
        return score * 0.5

    def counted_mask_mod(b, h, q_idx, kv_idx):
        calls["mask_mod"] += 1
        return q_idx >= kv_idx

    block_mask = create_block_mask(counted_mask_mod, None, None, 64, 64, device=DEVICE, BLOCK_SIZE=16)
    assert calls == {"score_mod": 0, "mask_mod": 1}
    # The dense path evaluates the score_mod once per query block, and the mask_mod once
    # for the partial tiles of as many query blocks as its budget holds (here all four).
    once = {"score_mod": 64 // 16, "mask_mod": 1}
    query = Q.clone().requires_grad_()
    for grad_mode, inputs in ((torch.no_grad, Q), (torch.enable_grad, Q), (torch.enable_grad, query)):
        calls.update(score_mod=0, mask_mod=0)
        with grad_mode():
            out = flex_attention(inputs, Q, Q, score_mod=counted_score_mod, block_mask=block_mask)
        assert calls == once, (grad_mode, inputs.requires_grad)
    calls.update(score_mod=0, mask_mod=0)
    out.sum().backward()
    assert calls == once


def test_captured_tensor_needing_grad_is_still_found():
    """The probe is skipped only when provably unneeded: a learned bias reached through a
    closure, a global-like container or a module attribute still gets its gradient."""
    bias = torch.zeros(4, device=DEVICE, requires_grad=True)
    holder = {"bias": bias}
    module = torch.nn.Linear(1, 4, device=DEVICE)

    class Config:
        learned = torch.zeros(4, device=DEVICE, requires_grad=True)

    add_bias = bias.add  # a builtin method bound to the tensor
    mods = [lambda s, b, h, q, kv: s + bias[h],
            lambda s, b, h, q, kv: s + holder["bias"][h],
            lambda s, b, h, q, kv: s + module.bias[h],
            lambda s, b, h, q, kv: s + Config.learned[h],
            lambda s, b, h, q, kv: add_bias(s)[h]]
    for score_mod, leaf in zip(mods, (bias, bias, module.bias, Config.learned, bias)):
        leaf.grad = None
        flex_attention(Q, Q, Q, score_mod=score_mod).sum().backward()
        assert leaf.grad is not None


def test_guide_lists_every_bad_input_case():
    import pathlib
    guide = (pathlib.Path(__file__).resolve().parents[1] / "docs" / "guide.md").read_text()
    missing = [case for case in BAD_INPUTS if f"| `{case}` |" not in guide]
    assert not missing, f"docs/guide.md's errors table lacks {missing}"
