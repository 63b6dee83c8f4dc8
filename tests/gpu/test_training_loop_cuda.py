"""The training loop of tests/test_training_loop.py on the GPU, through the fused Triton
kernels: a 2-layer transformer on EOS-packed documents, compiled whole (with and without
activation checkpointing). Losses and gradients match SDPA with the dense mask in float32
(TF32 off); the loss falls; the model and the mask builder compile once across batches.
Skips without CUDA (the ``device`` fixture of tests/gpu/conftest.py)."""
import pathlib
import sys

import pytest
import torch
import torch._dynamo.testing

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # tests/, for the model
from tiny_packed_lm import (  # noqa: E402
    build_document_causal_block_mask,
    dense_document_causal_mask,
    document_block_mask,
    document_ids_from_eos,
    next_token_loss,
    packed_batch,
    training_step,
    twin_models,
)

BATCH, SEQ_LEN = 2, 1024
EOS_POSITIONS = [(40, 127, 300, 700), (99, 511, 512, 1023)]
OTHER_EOS_POSITIONS = [(10, 128, 129, 900), (63, 64, 390)]


@pytest.fixture
def ieee_float32():
    """SDPA and the kernels both in exact float32 matmuls, so they can agree to ~1e-5."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def test_compiled_mask_builder_matches_and_compiles_once(device):
    counter = torch._dynamo.testing.CompileCounterWithBackend("inductor")
    builder = torch.compile(build_document_causal_block_mask.__wrapped__, backend=counter,
                            dynamic=False)
    for seed, eos_positions in enumerate([EOS_POSITIONS, OTHER_EOS_POSITIONS, EOS_POSITIONS]):
        tokens = packed_batch(BATCH, SEQ_LEN, eos_positions, seed=seed, device=device)
        block_mask = builder(document_ids_from_eos(tokens))
        assert torch.equal(block_mask.to_dense(), document_block_mask(tokens).to_dense())
    assert counter.frame_count == 1


@pytest.mark.parametrize("activation_checkpointing", [None, "full", "selective"])
def test_compiled_training_steps_match_sdpa_and_lower_the_loss(device, ieee_float32,
                                                               activation_checkpointing):
    model, reference = twin_models(device=device, dim=128, heads=2,
                                   activation_checkpointing=activation_checkpointing)
    counter = torch._dynamo.testing.CompileCounterWithBackend("inductor")
    step_fn = torch.compile(next_token_loss, backend=counter)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    reference_optimizer = torch.optim.AdamW(reference.parameters(), lr=1e-2)

    batches = [packed_batch(BATCH, SEQ_LEN, EOS_POSITIONS, seed=0, device=device),
               packed_batch(BATCH, SEQ_LEN, OTHER_EOS_POSITIONS, seed=1, device=device)]
    losses = []
    for step in range(6):
        tokens = batches[step % 2]
        block_mask = build_document_causal_block_mask(document_ids_from_eos(tokens))
        loss, grads = training_step(model, optimizer, tokens, block_mask, step_fn)
        reference_loss, reference_grads = training_step(reference, reference_optimizer, tokens,
                                                        dense_document_causal_mask(tokens))
        torch.testing.assert_close(loss, reference_loss, rtol=1e-4, atol=1e-4)
        for name, grad in grads.items():
            torch.testing.assert_close(grad, reference_grads[name], rtol=1e-3, atol=1e-4,
                                       msg=lambda m: f"step {step}, {name}: {m}")
        losses.append(loss.item())
    assert losses[-2] < losses[0] - 0.1 and losses[-1] < losses[1] - 0.1, losses
    assert counter.frame_count == 1
