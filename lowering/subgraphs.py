"""score_mod / mask_mod subgraphs -> buffers a Triton template can inline.

Inductor hands the lowering each mod as an ``ir.Subgraph`` (the FX graph module Dynamo
recorded). We lower that graph once, pointwise, with Inductor's ``PointwiseSubgraphLowering``:
its inputs are scalar placeholder buffers named after the template variables they stand
for (``score``, ``b``, ``h``, ``m``, ``n``) followed by the mod's captured buffers, and its
output is a single scalar expression. Wrapped in a ``ComputedBuffer``, that expression is
what ``TritonTemplateKernel.modification`` expands inside the kernel: loads of a
placeholder become the template variable of the same name (a whole tile of scores,
``[BLOCK_M, 1]`` query indices, ...), loads of a captured buffer become real ``tl.load``s
from a kernel argument.

Two score_mod rewrites happen here, both decided before the kernel exists:

- an identity score_mod is recognised on the graph and not inlined at all;
- for float16 / bfloat16 queries, ``aten.tanh`` lowers to the PTX instruction
  ``tanh.approx.f32`` (one MUFU op instead of libdevice's ~20-instruction tanh). Its
  maximum relative error is about 2^-11 (PTX ISA; measured in tests/gpu), below the
  2^-9 rounding of those dtypes, so a tanh soft-cap keeps the accuracy of the
  half-precision result. float32 queries keep the exact tanh.
"""
import functools
from typing import Optional, Sequence

import torch
import torch.fx
from torch._inductor import ir
from torch._inductor.virtualized import V, ops

aten = torch.ops.aten

# Names of the scalar placeholders, in the mods' argument order. They must match the
# keyword names the template passes to ``modification(...)``.
SCORE_MOD_PLACEHOLDERS = ("score", "b", "h", "m", "n")
MASK_MOD_PLACEHOLDERS = ("b", "h", "m", "n")


class ModLoweringError(RuntimeError):
    """The mod cannot be inlined as one pointwise expression (the lowering then falls back)."""


def _placeholder(name: str, dtype: torch.dtype, device: torch.device):
    buffer = ir.InputBuffer(name=name, layout=ir.FixedLayout(device, dtype, [], []))
    return ir.TensorBox.create(buffer)


def _approx_tanh(x):
    """``aten.tanh`` as ``tanh.approx.f32`` (computed in float32, returned in x's dtype)."""
    from torch._inductor.lowering import make_pointwise, to_dtype

    source_dtype = x.get_dtype()
    if not source_dtype.is_floating_point:
        x = to_dtype(x, torch.float32)
        source_dtype = torch.float32
    x32 = to_dtype(x, torch.float32) if source_dtype != torch.float32 else x
    asm = functools.partial(ops.inline_asm_elementwise, asm="tanh.approx.f32 $0, $1;",
                            constraints="=f,f", dtype=torch.float32, is_pure=True, pack=1)
    y = make_pointwise(asm)(x32)
    return to_dtype(y, source_dtype) if source_dtype != torch.float32 else y


def _single_output(outputs):
    while isinstance(outputs, (list, tuple)):
        if len(outputs) != 1:
            raise ModLoweringError(f"a mod must return one value, its graph returns {len(outputs)}")
        outputs = outputs[0]
    return outputs


def build_mod_buffer(mod: ir.Subgraph, placeholder_names: Sequence[str],
                     placeholder_dtypes: Sequence[torch.dtype], buffers: Sequence,
                     device: torch.device, approx_tanh: bool = False) -> ir.ComputedBuffer:
    """Lower ``mod`` pointwise over scalar placeholders; return its output as a buffer for
    ``modification``. Raises ``ModLoweringError`` if the graph needs more than one
    pointwise expression (e.g. it would materialize an intermediate tensor)."""
    from torch._inductor.subgraph_lowering import PointwiseSubgraphLowering

    inputs = [_placeholder(name, dtype, device)
              for name, dtype in zip(placeholder_names, placeholder_dtypes)]
    inputs += list(buffers)
    additional = {aten.tanh.default: _approx_tanh} if approx_tanh else None
    lowering = PointwiseSubgraphLowering(mod.graph_module, root_graph_lowering=V.graph,
                                         additional_lowerings=additional)
    try:
        with V.set_graph_handler(lowering):
            lowering.run(*inputs)
    except Exception as error:  # Inductor raises several types here; all mean "not inlinable".
        raise ModLoweringError(f"cannot inline {mod.name}: {error}") from error

    out = _single_output(lowering.graph_outputs)
    if not isinstance(out, ir.IRNode):
        raise ModLoweringError(f"{mod.name} returns {type(out).__name__}, not a tensor")
    if len(out.get_size()) != 0:
        raise ModLoweringError(f"{mod.name} must return a scalar, got shape {out.get_size()}")
    # One scalar expression: whatever the output node is (a pointwise op, a placeholder,
    # a constant, a captured buffer), re-wrap its loader so modification() can expand it.
    expression = ir.Pointwise(device=device, dtype=out.get_dtype(), inner_fn=out.make_loader(),
                              ranges=[])
    buffer = ir.ComputedBuffer(
        name=None,
        layout=ir.FlexibleLayout(device=device, dtype=out.get_dtype(), size=[]),
        data=expression,
    )
    buffer.freeze_layout()
    return buffer


def _output_arg(graph_module: torch.fx.GraphModule) -> Optional[torch.fx.Node]:
    output = next(n for n in reversed(graph_module.graph.nodes) if n.op == "output")
    value = output.args[0]
    while isinstance(value, (list, tuple)) and len(value) == 1:
        value = value[0]
    return value if isinstance(value, torch.fx.Node) else None


def is_identity_score_mod(mod: ir.Subgraph) -> bool:
    """True when the score_mod returns its score argument unchanged (the graph's output is
    its first placeholder), so the kernel need not inline anything."""
    graph_module = mod.graph_module
    placeholders = [n for n in graph_module.graph.nodes if n.op == "placeholder"]
    if not placeholders:
        return False
    return _output_arg(graph_module) is placeholders[0]


def graph_uses_op(mod: ir.Subgraph, targets) -> bool:
    """Whether any node of the mod's graph calls one of ``targets``."""
    return any(n.op == "call_function" and n.target in targets
               for n in mod.graph_module.graph.nodes)
