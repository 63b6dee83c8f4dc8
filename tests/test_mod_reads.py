"""Which captured-buffer reads of a mod are tile-sized (``gathered_bytes_per_score``): the
lowerings size the kernels' shared memory by them (lowering/configs.py). The mods are the
aten graphs the lowerings receive, captured by compiling flex_attention."""
from types import SimpleNamespace

import torch
from functorch.compile import make_boxed_func
from torch._dynamo.backends.common import aot_autograd

from inductor_flex import create_block_mask, flex_attention
from inductor_flex.lowering.subgraphs import (
    JOINT_PLACEHOLDERS, MASK_MOD_PLACEHOLDERS, SCORE_MOD_PLACEHOLDERS, gathered_bytes_per_score)
from inductor_flex.ops import inductor_flex_attention, inductor_flex_attention_backward

B, H, S, D = 1, 2, 128, 16


def _ir_like(node):
    """A captured buffer as the lowerings see it: something with a dtype."""
    return SimpleNamespace(get_dtype=lambda: node.meta["val"].dtype)


def _operator_calls(score_mod=None, mask_mod=None, backward=False):
    """The forward (and backward) operator nodes of a compiled flex_attention call, with
    their graph modules."""
    calls = []

    def keep(gm, example_inputs):
        calls.extend((gm, n) for n in gm.graph.nodes if n.op == "call_function" and n.target in
                     (inductor_flex_attention, inductor_flex_attention_backward))
        return make_boxed_func(gm.forward)

    torch._dynamo.reset()
    q = torch.randn(B, H, S, D, requires_grad=backward)
    block_mask = None if mask_mod is None else create_block_mask(mask_mod, None, None, S, S,
                                                                 device="cpu")
    fn = torch.compile(lambda q: flex_attention(q, q, q, score_mod=score_mod, block_mask=block_mask),
                       backend=aot_autograd(fw_compiler=keep, bw_compiler=keep), fullgraph=True)
    out = fn(q)
    if backward:
        out.sum().backward()
    return calls


def forward_bytes(score_mod=None, mask_mod=None):
    """(score_mod's, mask_mod's) tile-read bytes per score."""
    ((gm, node),) = _operator_calls(score_mod, mask_mod)
    score = getattr(gm, node.args[3].target)
    mask = getattr(gm, node.args[4][-1].target)
    score_buffers, mask_buffers = node.args[-2], node.args[-1]
    return (gathered_bytes_per_score(SimpleNamespace(graph_module=score), SCORE_MOD_PLACEHOLDERS,
                                     [_ir_like(b) for b in score_buffers]),
            gathered_bytes_per_score(SimpleNamespace(graph_module=mask), MASK_MOD_PLACEHOLDERS,
                                     [_ir_like(b) for b in mask_buffers]))


def test_full_bias_and_relative_table_are_tile_reads():
    bias = torch.randn(B, H, S, S)
    table = torch.randn(2 * S, dtype=torch.bfloat16)
    assert forward_bytes(lambda s, b, h, m, n: s + bias[b, h, m, n]) == (4, 0)
    assert forward_bytes(lambda s, b, h, m, n: s + bias[b][h][m][n]) == (4, 0)
    assert forward_bytes(lambda s, b, h, m, n: s + table[m - n + S]) == (2, 0)
    assert forward_bytes(lambda s, b, h, m, n: s + bias[b, h, m, n] + table[m - n]) == (6, 0)


def test_reads_along_one_position_are_not_tile_reads():
    slopes, rows = torch.randn(H), torch.randn(S)
    assert forward_bytes(lambda s, b, h, m, n: s + slopes[h] * (n - m)) == (0, 0)
    assert forward_bytes(lambda s, b, h, m, n: s + rows[m] - rows[n]) == (0, 0)


def test_mask_reads():
    doc = torch.zeros(S, dtype=torch.int32)
    assert forward_bytes(mask_mod=lambda b, h, m, n: (doc[m] == doc[n]) & (m >= n)) == (0, 0)
    allowed = torch.ones(S, S, dtype=torch.bool)
    assert forward_bytes(mask_mod=lambda b, h, m, n: allowed[m, n]) == (0, 1)


def test_joint_graph_score_gradient_reads():
    bias = torch.randn(B, H, S, S)
    calls = _operator_calls(lambda s, b, h, m, n: s * bias[b, h, m, n], backward=True)
    ((gm, node),) = [(gm, n) for gm, n in calls if n.target is inductor_flex_attention_backward]
    joint = next(getattr(gm, a.target) for a in node.args if isinstance(a, torch.fx.Node)
                 and a.op == "get_attr" and "joint" in a.target)
    buffers = [_ir_like(b) for b in node.args[-2]]
    # d(s * bias)/ds = bias: the score gradient reads the bias tile again.
    assert gathered_bytes_per_score(SimpleNamespace(graph_module=joint), JOINT_PLACEHOLDERS,
                                    buffers, output_index=0) == 4
    assert gathered_bytes_per_score(None, JOINT_PLACEHOLDERS, ()) == 0
