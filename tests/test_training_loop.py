"""A training loop on CPU: a 2-layer transformer on packed documents (docs/guide.md, "Use
it in a training loop"), eager, compiled as a whole, and with activation checkpointing (full, selective, and full
under torch.compile).

Every step's loss and parameter gradients match the same model running
scaled_dot_product_attention with the dense document mask, in float32; the loss falls over
a few optimizer steps; the block masks built from EOS positions (block arithmetic, or the
cached compiled builder) are the dense mask, and the compiled builder compiles once.
"""
import pytest
import torch
import torch._dynamo
import torch._dynamo.testing

from inductor_flex import and_masks, create_block_mask, create_mask
from inductor_flex.masks import causal_mask

from tiny_packed_lm import (
    build_document_causal_block_mask,
    dense_document_causal_mask,
    document_block_mask,
    document_ids_from_eos,
    next_token_loss,
    packed_batch,
    training_step,
    twin_models,
)

BATCH, SEQ_LEN = 2, 256
# Documents of several lengths, crossing and ending on the 128-token block edges.
EOS_POSITIONS = [(40, 127, 200), (99, 255)]
OTHER_EOS_POSITIONS = [(10, 128, 129), (63, 64, 190)]


pytestmark = pytest.mark.usefixtures("fresh_dynamo")


def element_mask(block_mask, seq_len):
    """The token-level mask a BlockMask's mask_mod keeps, [B, 1, S, S] (for both builders
    the mask_mod is the exact element mask; the block lists only skip work)."""
    return create_mask(block_mask.mask_mod, BATCH, 1, seq_len, seq_len, device="cpu")


@pytest.mark.parametrize("eos_positions", [EOS_POSITIONS, OTHER_EOS_POSITIONS])
def test_block_masks_from_eos_positions_are_the_dense_document_mask(eos_positions):
    tokens = packed_batch(BATCH, SEQ_LEN, eos_positions)
    expected = dense_document_causal_mask(tokens)
    assert torch.equal(element_mask(document_block_mask(tokens), SEQ_LEN), expected)
    compiled = build_document_causal_block_mask(document_ids_from_eos(tokens))
    assert torch.equal(element_mask(compiled, SEQ_LEN), expected)
    assert torch.equal(compiled.to_dense(), document_block_mask(tokens).to_dense())


def test_compiled_mask_builder_compiles_once_for_every_batch():
    counter = torch._dynamo.testing.CompileCounter()
    builder = torch.compile(build_document_causal_block_mask.__wrapped__, backend=counter,
                            dynamic=False)
    for seed, eos_positions in enumerate([EOS_POSITIONS, OTHER_EOS_POSITIONS, EOS_POSITIONS]):
        tokens = packed_batch(BATCH, SEQ_LEN, eos_positions, seed=seed)
        block_mask = builder(document_ids_from_eos(tokens))
        assert torch.equal(block_mask.to_dense(), document_block_mask(tokens).to_dense())
    assert counter.frame_count == 1


def test_torchtitan_style_compiled_create_block_mask_compiles_once_for_every_batch():
    """docs/guide.md's form: create_block_mask compiled once, called with a new mask_mod
    closure (over the batch's document ids) every batch."""
    counter = torch._dynamo.testing.CompileCounter()
    compiled_create_block_mask = torch.compile(create_block_mask, backend=counter)
    for seed, eos_positions in enumerate([EOS_POSITIONS, OTHER_EOS_POSITIONS, EOS_POSITIONS]):
        tokens = packed_batch(BATCH, SEQ_LEN, eos_positions, seed=seed)
        document_ids = document_ids_from_eos(tokens)

        def same_document(b, h, q_idx, kv_idx):
            return document_ids[b, q_idx] == document_ids[b, kv_idx]

        block_mask = compiled_create_block_mask(and_masks(causal_mask, same_document),
                                                BATCH, None, SEQ_LEN, SEQ_LEN, device="cpu")
        assert torch.equal(block_mask.to_dense(), document_block_mask(tokens).to_dense())
        assert torch.equal(element_mask(block_mask, SEQ_LEN), dense_document_causal_mask(tokens))
    assert counter.frame_count == 1


MODES = {
    "eager": dict(compile=False, activation_checkpointing=None),
    "compiled": dict(compile=True, activation_checkpointing=None),
    "checkpointed": dict(compile=False, activation_checkpointing="full"),
    "selective-checkpointed": dict(compile=False, activation_checkpointing="selective"),
    "compiled+checkpointed": dict(compile=True, activation_checkpointing="full"),
}


@pytest.mark.parametrize("mode", MODES)
def test_training_steps_match_sdpa_with_dense_mask_and_lower_the_loss(mode):
    options = MODES[mode]
    model, reference = twin_models(activation_checkpointing=options["activation_checkpointing"])
    counter = torch._dynamo.testing.CompileCounterWithBackend("inductor")
    step_fn = torch.compile(next_token_loss, backend=counter) if options["compile"] else next_token_loss
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    reference_optimizer = torch.optim.AdamW(reference.parameters(), lr=1e-2)

    # Two packed batches, alternately: each step builds its masks from the EOS positions.
    batches = [packed_batch(BATCH, SEQ_LEN, EOS_POSITIONS, seed=0),
               packed_batch(BATCH, SEQ_LEN, OTHER_EOS_POSITIONS, seed=1)]
    losses = []
    for step in range(6):
        tokens = batches[step % 2]
        loss, grads = training_step(model, optimizer, tokens, document_block_mask(tokens), step_fn)
        reference_loss, reference_grads = training_step(reference, reference_optimizer, tokens,
                                                        dense_document_causal_mask(tokens))
        torch.testing.assert_close(loss, reference_loss, rtol=1e-5, atol=1e-5)
        for name, grad in grads.items():
            torch.testing.assert_close(grad, reference_grads[name], rtol=1e-4, atol=1e-5,
                                       msg=lambda m: f"step {step}, {name}: {m}")
        losses.append(loss.item())
    assert losses[-2] < losses[0] - 0.1 and losses[-1] < losses[1] - 0.1, losses
    if options["compile"]:
        assert counter.frame_count == 1  # a new batch's masks are new data, not a recompile
