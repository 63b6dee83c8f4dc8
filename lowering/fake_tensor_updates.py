"""Tell Inductor's ``FakeTensorUpdater`` which arguments our operators pass to their subgraphs.

After the post-grad passes, ``torch._inductor.fx_utils.FakeTensorUpdater`` refreshes the
fake tensors of every node that calls a subgraph. To refresh a subgraph's placeholders it
asks ``_extract_subgraphs_and_args`` what the node passes to each subgraph; that function
knows PyTorch's own higher-order operators by name and, for any other, warns "Please add
support for subgraph args to function <op>!" and leaves the placeholders as they are.

Our operators call their mods exactly as PyTorch's flex_attention does (a score and four
indices, then captured buffers; docs/internals.md), so the rule here answers the same way
PyTorch's own flex_attention rule does: the placeholders' own 0-d examples for the scalar
arguments, the node's buffers for the rest. Every other operator goes to Inductor's rule.
"""
from typing import Any, Iterator

import torch

from inductor_flex._block_lists import OperatorBlockMask
from inductor_flex.ops import inductor_flex_attention, inductor_flex_attention_backward

# Leading 0-d arguments of each subgraph, before its captured buffers.
SCORE_MOD_SCALARS = 5   # score, b, h, q_idx, kv_idx
JOINT_SCALARS = 6       # the score_mod's five, then the gradient of its output
MASK_MOD_SCALARS = 4    # b, h, q_idx, kv_idx


def _placeholder_values(subgraph: torch.fx.GraphModule) -> list:
    from torch._inductor.fx_utils import get_fake

    return [get_fake(p, subgraph) for p in subgraph.graph.find_nodes(op="placeholder")]


def _call(subgraph: Any, scalars: int, buffers: tuple) -> tuple[Any, tuple | None]:
    """``(subgraph, the arguments it is called with)``; None for the arguments where the
    placeholders do not have that shape (Inductor then keeps them as they are)."""
    if not isinstance(subgraph, torch.fx.GraphModule):
        return subgraph, None
    placeholders = _placeholder_values(subgraph)
    if len(placeholders) != scalars + len(buffers):
        return subgraph, None
    return subgraph, (*placeholders[:scalars], *buffers)


def subgraph_calls(node: torch.fx.Node, args: tuple) -> Iterator[tuple[Any, tuple | None]]:
    """The ``(subgraph, arguments)`` pairs a node of our operators makes, read from its
    (fake) arguments in the operator's order (docs/internals.md)."""
    if node.target is inductor_flex_attention:
        (_q, _k, _v, score_graph, block_mask, _scale, _options,
         score_buffers, mask_buffers) = args
        yield _call(score_graph, SCORE_MOD_SCALARS, tuple(score_buffers))
        yield _call(OperatorBlockMask(*block_mask).mask_mod, MASK_MOD_SCALARS, tuple(mask_buffers))
    elif node.target is inductor_flex_attention_backward:
        (_q, _k, _v, _out, _lse, _grad_out, _grad_lse, fw_graph, joint_graph, block_mask,
         _scale, _options, score_buffers, mask_buffers) = args
        yield _call(fw_graph, SCORE_MOD_SCALARS, tuple(score_buffers))
        yield _call(joint_graph, JOINT_SCALARS, tuple(score_buffers))
        yield _call(OperatorBlockMask(*block_mask).mask_mod, MASK_MOD_SCALARS, tuple(mask_buffers))


def install() -> None:
    """Put our rule in front of Inductor's ``_extract_subgraphs_and_args`` (idempotent).
    A torch without that function has no such updater, and nothing to warn about."""
    from torch._inductor import fx_utils

    inductor_rule = getattr(fx_utils, "_extract_subgraphs_and_args", None)
    if inductor_rule is None or getattr(inductor_rule, "knows_inductor_flex", False):
        return

    def extract_subgraphs_and_args(node, valid_subgraphs, *args, **kwargs):
        if node.target not in (inductor_flex_attention, inductor_flex_attention_backward):
            yield from inductor_rule(node, valid_subgraphs, *args, **kwargs)
            return
        # The operators are called positionally (their proxy registrations make the node).
        for subgraph, subgraph_args in subgraph_calls(node, args):
            if subgraph in valid_subgraphs:
                yield subgraph, subgraph_args

    extract_subgraphs_and_args.knows_inductor_flex = True
    extract_subgraphs_and_args.__wrapped__ = inductor_rule
    fx_utils._extract_subgraphs_and_args = extract_subgraphs_and_args
