"""A 2-layer transformer trained on packed documents, for the training-loop tests (CPU in
tests/test_training_loop.py, CUDA in tests/gpu/test_training_loop_cuda.py).

Documents are packed into each row and separated by an EOS token, as torchtitan and
torchtune pack them; attention is causal within each document. The same model runs with
flex_attention and a BlockMask, or with scaled_dot_product_attention and the dense boolean
mask (the reference). The code follows docs/guide.md, "Use it in a training loop".
"""
import functools

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import (
    CheckpointPolicy,
    checkpoint,
    create_selective_checkpoint_contexts,
)

import inductor_flex
from inductor_flex import create_block_mask, flex_attention
from inductor_flex.masks import create_document_block_mask

EOS = 0
VOCAB = 64


def packed_batch(batch: int, seq_len: int, eos_positions, seed: int = 0, device="cpu") -> Tensor:
    """Random tokens in [1, VOCAB) with EOS at the given positions of each row."""
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, VOCAB, (batch, seq_len), generator=generator)
    for row, positions in enumerate(eos_positions):
        tokens[row, list(positions)] = EOS
    return tokens.to(device)


def document_ids_from_eos(tokens: Tensor, eos_id: int = EOS) -> Tensor:
    """Document index of every token, [B, S]: a document ends with (and includes) its EOS."""
    is_end = (tokens == eos_id).int()
    return torch.cumsum(is_end, dim=1) - is_end


def document_offsets_from_eos(tokens: Tensor, eos_id: int = EOS) -> list[Tensor]:
    """Per row, ``[0, end_0, end_1, ..., S]``: each document ends just after an EOS."""
    seq_len = tokens.shape[1]
    offsets = []
    for row in tokens:
        ends = (row == eos_id).nonzero().flatten() + 1
        ends = ends[ends < seq_len]
        edges = torch.tensor([0, seq_len], device=tokens.device)
        offsets.append(torch.cat([edges[:1], ends, edges[1:]]))
    return offsets


@torch.compile(dynamic=False)
def build_document_causal_block_mask(document_ids: Tensor):
    """Compiled once per shape and reused for every batch: the document ids are a tensor
    argument, so a new batch is new data for the same graph, not a new closure to guard on."""
    def same_document_causal(b, h, q_idx, kv_idx):
        return (document_ids[b, q_idx] == document_ids[b, kv_idx]) & (kv_idx <= q_idx)

    batch, seq_len = document_ids.shape
    return create_block_mask(same_document_causal, batch, None, seq_len, seq_len,
                             device=document_ids.device)


def dense_document_causal_mask(tokens: Tensor) -> Tensor:
    """The reference's boolean mask, [B, 1, S, S]."""
    ids = document_ids_from_eos(tokens)
    positions = torch.arange(tokens.shape[1], device=tokens.device)
    causal = positions[None, :] <= positions[:, None]
    return ((ids[:, :, None] == ids[:, None, :]) & causal)[:, None]


def document_block_mask(tokens: Tensor):
    """The BlockMask of the batch, from the block arithmetic of the document boundaries."""
    return create_document_block_mask(offsets=document_offsets_from_eos(tokens), causal=True,
                                      device=tokens.device)


def flex(q, k, v, mask):
    return flex_attention(q, k, v, block_mask=mask)


def sdpa(q, k, v, mask):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, attention):
        super().__init__()
        self.heads, self.attention = heads, attention
        self.attention_norm, self.mlp_norm = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.out = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: Tensor, mask) -> Tensor:
        batch, seq_len, dim = x.shape
        qkv = self.qkv(self.attention_norm(x)).view(batch, seq_len, 3, self.heads, dim // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        attended = self.attention(q, k, v, mask).transpose(1, 2).reshape(batch, seq_len, dim)
        x = x + self.out(attended)
        return x + self.mlp(self.mlp_norm(x))


def save_attention_recompute_the_rest(ctx, op, *args, **kwargs):
    """Selective checkpointing policy: keep the attention outputs (the costly op), recompute
    everything else in the backward."""
    if op is inductor_flex.inductor_flex_attention:
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


class TinyPackedLM(nn.Module):
    """``activation_checkpointing``: None, "full" (recompute each block in the backward) or
    "selective" (recompute all but the attention)."""

    def __init__(self, attention, dim: int = 32, heads: int = 2, layers: int = 2,
                 activation_checkpointing: str | None = None):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, dim)
        self.blocks = nn.ModuleList(Block(dim, heads, attention) for _ in range(layers))
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, VOCAB)
        self.activation_checkpointing = activation_checkpointing

    def forward(self, tokens: Tensor, mask) -> Tensor:
        x = self.embed(tokens)
        for block in self.blocks:
            if self.activation_checkpointing == "full":
                # The block's activations are recomputed in the backward; attention runs again.
                x = checkpoint(block, x, mask, use_reentrant=False)
            elif self.activation_checkpointing == "selective":
                contexts = functools.partial(create_selective_checkpoint_contexts,
                                             save_attention_recompute_the_rest)
                x = checkpoint(block, x, mask, use_reentrant=False, context_fn=contexts)
            else:
                x = block(x, mask)
        return self.head(self.norm(x))


def next_token_loss(model, tokens: Tensor, mask) -> Tensor:
    logits = model(tokens, mask)
    return F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), tokens[:, 1:].reshape(-1))


def training_step(model, optimizer, tokens: Tensor, mask, step_fn=next_token_loss):
    """Forward, backward, optimizer step; returns (loss, {name: gradient})."""
    optimizer.zero_grad(set_to_none=True)
    loss = step_fn(model, tokens, mask)
    loss.backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters()}
    optimizer.step()
    return loss.detach(), grads


def twin_models(seed: int = 0, device="cpu", **options):
    """The flex model and its SDPA reference, with the same initial weights."""
    torch.manual_seed(seed)
    model = TinyPackedLM(flex, **options).to(device)
    reference = TinyPackedLM(sdpa, **options).to(device)
    reference.load_state_dict(model.state_dict())
    return model, reference
