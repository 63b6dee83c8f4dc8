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


def _lower_pointwise(graph_module: torch.fx.GraphModule, inputs: Sequence, name: str,
                     approx_tanh: bool) -> list:
    """Run Inductor's pointwise lowering of ``graph_module`` on ``inputs``; its outputs."""
    from torch._inductor.subgraph_lowering import PointwiseSubgraphLowering

    additional = {aten.tanh.default: _approx_tanh} if approx_tanh else None
    lowering = PointwiseSubgraphLowering(graph_module, root_graph_lowering=V.graph,
                                         additional_lowerings=additional)
    try:
        with V.set_graph_handler(lowering):
            lowering.run(*inputs)
    except Exception as error:  # Inductor raises several types here; all mean "not inlinable".
        raise ModLoweringError(f"cannot inline {name}: {error}") from error
    return lowering.graph_outputs


def _wrap_expression(out, device) -> ir.ComputedBuffer:
    """A scalar IR value as the ComputedBuffer ``modification`` expands: whatever the node
    is (a pointwise op, a placeholder, a constant, a captured buffer), its loader is
    re-wrapped as one expression."""
    expression = ir.Pointwise(device=device, dtype=out.get_dtype(), inner_fn=out.make_loader(),
                              ranges=[])
    buffer = ir.ComputedBuffer(
        name=None,
        layout=ir.FlexibleLayout(device=device, dtype=out.get_dtype(), size=[]),
        data=expression,
    )
    buffer.freeze_layout()
    return buffer


def build_mod_buffer(mod: ir.Subgraph, placeholder_names: Sequence[str],
                     placeholder_dtypes: Sequence[torch.dtype], buffers: Sequence,
                     device: torch.device, approx_tanh: bool = False) -> ir.ComputedBuffer:
    """Lower ``mod`` pointwise over scalar placeholders; return its output as a buffer for
    ``modification``. Raises ``ModLoweringError`` if the graph needs more than one
    pointwise expression (e.g. it would materialize an intermediate tensor)."""
    inputs = [_placeholder(name, dtype, device)
              for name, dtype in zip(placeholder_names, placeholder_dtypes)]
    inputs += list(buffers)
    out = _single_output(_lower_pointwise(mod.graph_module, inputs, mod.name, approx_tanh))
    if not isinstance(out, ir.IRNode):
        raise ModLoweringError(f"{mod.name} returns {type(out).__name__}, not a tensor")
    if len(out.get_size()) != 0:
        raise ModLoweringError(f"{mod.name} must return a scalar, got shape {out.get_size()}")
    return _wrap_expression(out, device)


def _output_node(graph_module: torch.fx.GraphModule) -> torch.fx.Node:
    return next(n for n in reversed(graph_module.graph.nodes) if n.op == "output")


def _output_arg(graph_module: torch.fx.GraphModule) -> Optional[torch.fx.Node]:
    value = _output_node(graph_module).args[0]
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


# ---------------------------------------------------------------------------------------
# Shared memory the mods' reads take: captured-buffer elements gathered per score
# ---------------------------------------------------------------------------------------
# A mod that reads a captured buffer at an index that depends on both the query and the key
# position (a [B, H, S, S] bias, a relative table at q - kv) loads a whole tile of it per
# step; Triton's software pipeline stages such loads in shared memory like K and V, so with
# several of them the default tiles can outgrow the GPU. Views and indexing keep a value
# "a part of the buffer"; the first other use is where its elements are read.

_INDEXING_OPS = frozenset({
    aten.index.Tensor, aten._unsafe_index.Tensor, aten.index_select.default,
    aten.gather.default, aten.take.default,
})
_VIEW_OPS = frozenset({
    aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.expand.default,
    aten.permute.default, aten.t.default, aten.transpose.int, aten.select.int,
    aten.slice.Tensor, aten.squeeze.dim, aten.squeeze.default, aten.unsqueeze.default,
    aten.alias.default,
})


def gathered_bytes_per_score(mod: Optional[ir.Subgraph], placeholder_names: Sequence[str],
                             buffers: Sequence, output_index: Optional[int] = None) -> int:
    """Bytes per score of the captured-buffer elements ``mod`` reads at an index depending
    on both ``m`` (query) and ``n`` (key): each such read is a tile-sized load in the kernel.

    ``placeholder_names`` are the mod's leading placeholders; the captured buffers follow in
    the order of ``buffers`` (IR nodes, for their dtypes). With ``output_index``, only the
    reads that output needs count. Reads indexed by batch or head alone, or by one of the
    positions (a per-head slope, a document id per query), are scalars or vectors per tile
    and are not counted.
    """
    if mod is None:
        return 0
    graph = mod.graph_module.graph
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    positions = {node: {name} for name, node in zip(placeholder_names, placeholders)
                 if name in ("m", "n")}
    captured = dict(zip(placeholders[len(placeholder_names):], buffers))

    needed = None
    if output_index is not None:
        outputs = _output_node(mod.graph_module).args[0]
        root = outputs[output_index] if isinstance(outputs, (list, tuple)) else outputs
        needed, stack = set(), [root] if isinstance(root, torch.fx.Node) else []
        while stack:
            node = stack.pop()
            if node not in needed:
                needed.add(node)
                stack.extend(node.all_input_nodes)

    depends = {}  # node -> the positions ("m", "n") its value depends on
    part_of = {}  # node -> (captured placeholder, positions its indices depend on)
    reads = set()  # (captured placeholder node, the view read) with both positions
    for node in graph.nodes:
        inputs = node.all_input_nodes
        depends[node] = set(positions.get(node, ())).union(*(depends[a] for a in inputs))
        if node in captured:
            part_of[node] = (node, frozenset())
            continue
        source = inputs[0] if inputs and node.op == "call_function" else None
        if source in part_of and node.target in _INDEXING_OPS | _VIEW_OPS:
            buffer, indexed_by = part_of[source]
            index_positions = set().union(*(depends[a] for a in inputs[1:]))
            part_of[node] = (buffer, indexed_by | frozenset(index_positions))
            continue
        if needed is not None and node.op != "output" and node not in needed:
            continue
        for a in inputs:
            if a in part_of and part_of[a][1] >= {"m", "n"} and (needed is None or a in needed):
                reads.add((part_of[a][0], a))
    return sum(captured[buffer].get_dtype().itemsize for buffer, _ in reads)


# ---------------------------------------------------------------------------------------
# The joint graph: the score gradient, and captured-buffer gradients as atomic scatters
# ---------------------------------------------------------------------------------------
# The backward operator's joint graph maps (score, b, h, m, n, grad_score, *buffers) to
# (gradient w.r.t. the pre-mod score, one gradient per buffer). Traced on 0-d examples, a
# buffer gradient is "zeros of the buffer's shape with this score's contribution added at
# the indices the mod read": ``index_put_(full(shape, 0), [i, j, ...], value, accumulate)``
# (several such terms, chained or added, when the mod reads the buffer more than once).
# Over the whole score grid the contributions sum, so the kernel adds each term's value at
# its indices atomically into a float32 (or float64, see lowering/backward.py) buffer. The terms are pulled apart on the FX graph,
# their indices and values lowered as ordinary scalar expressions, and each term becomes an
# ``ir.Scatter`` named after its float32 gradient buffer, which ``modification`` emits as
# a masked ``tl.atomic_add``.

JOINT_PLACEHOLDERS = SCORE_MOD_PLACEHOLDERS + ("grad_score",)

_ZERO_FACTORIES = (aten.full.default, aten.zeros.default, aten.new_zeros.default,
                   aten.zeros_like.default, aten.new_full.default)


def _is_zero_tensor(node) -> bool:
    if not isinstance(node, torch.fx.Node) or node.op != "call_function":
        return False
    if node.target in (aten.full.default, aten.new_full.default):
        fill = node.args[1] if node.target is aten.full.default else node.args[2]
        return fill == 0
    return node.target in _ZERO_FACTORIES


def _scatter_terms(node) -> list:
    """[(index nodes, value node)] whose accumulation is the buffer gradient ``node``."""
    if node.op == "call_function":
        if node.target in (aten.index_put_.default, aten.index_put.default):
            base, indices, values = node.args[:3]
            accumulate = node.args[3] if len(node.args) > 3 else node.kwargs.get("accumulate", False)
            if any(i is None for i in indices):
                raise ModLoweringError("a buffer gradient scatters along a slice")
            if len(base.users) != 1:
                raise ModLoweringError("a buffer gradient's base tensor is shared")
            if _is_zero_tensor(base):
                return [(list(indices), values)]  # one write into zeros: a sum either way
            if not accumulate:
                raise ModLoweringError("a buffer gradient overwrites an earlier term")
            base_terms = _scatter_terms(base)
            return base_terms + [(list(indices), values)]
        if node.target is aten.add.Tensor and all(isinstance(a, torch.fx.Node) for a in node.args[:2]):
            return _scatter_terms(node.args[0]) + _scatter_terms(node.args[1])
        if _is_zero_tensor(node):
            return []
    # A plain scalar: the whole contribution to a 0-d buffer.
    return [([], node)]


def _graph_of_outputs(graph_module: torch.fx.GraphModule, outputs: list) -> torch.fx.GraphModule:
    """A graph with the same placeholders computing only ``outputs`` (a flat tuple)."""
    needed = set()
    stack = list(outputs)
    while stack:
        node = stack.pop()
        if node in needed:
            continue
        needed.add(node)
        stack.extend(node.all_input_nodes)
    graph = torch.fx.Graph()
    env = {}
    for node in graph_module.graph.nodes:
        if node.op == "placeholder" or node in needed:
            env[node] = graph.node_copy(node, lambda n: env[n])
    graph.output(tuple(env[n] for n in outputs))
    return torch.fx.GraphModule(graph_module, graph)


def _atomic_scatter(grad_buffer, index_values: list, value, device) -> ir.ComputedBuffer:
    """``grad_buffer[indices] += value`` as a Scatter that ``modification`` emits atomically.

    ``grad_buffer`` is a contiguous float32 or float64 buffer; the ComputedBuffer carries
    its name and layout so the store lands in it."""
    index_loaders = [i.make_loader() for i in index_values]
    value_loader = value.make_loader()
    sizes = grad_buffer.get_size()

    def output_indexer(_):
        return [ops.indirect_indexing(load(()), size, check=False)
                for load, size in zip(index_loaders, sizes)]

    accumulate_dtype = grad_buffer.get_dtype()

    def inner_fn(_):
        return ops.to_dtype(value_loader(()), accumulate_dtype)

    scatter = ir.Scatter(device=device, dtype=accumulate_dtype, inner_fn=inner_fn, ranges=[],
                         output_indexer=output_indexer, scatter_mode="atomic_add")
    return ir.ComputedBuffer(name=grad_buffer.get_name(), layout=grad_buffer.get_layout(),
                             data=scatter)


def joint_buffer_gradients(joint: ir.Subgraph, num_buffers: int) -> list:
    """Which of the score_mod's buffers the joint graph returns a gradient for."""
    from inductor_flex.ops._shared import joint_graph_buffer_grads

    wanted = joint_graph_buffer_grads(joint.graph_module, num_buffers)
    if wanted is None:
        raise ModLoweringError(f"the joint graph must return 1 + {num_buffers} values")
    return wanted


def build_joint_buffers(joint: ir.Subgraph, score_dtype: torch.dtype, buffers: Sequence,
                        grad_buffers: Sequence, device: torch.device,
                        approx_tanh: bool = False) -> tuple:
    """Lower the joint graph for the backward template.

    ``grad_buffers`` holds, per score_mod buffer, the float32 / float64 gradient buffer the
    kernel accumulates into, or None. Returns ``(grad_score, scatters)``: the score gradient as a
    buffer for ``modification`` and the list of atomic scatters (possibly empty).
    Raises ``ModLoweringError`` for a buffer gradient that is not a sum of scatters.
    """
    graph_module = joint.graph_module
    outputs = list(_output_node(graph_module).args[0])
    if len(outputs) != 1 + len(buffers) or not isinstance(outputs[0], torch.fx.Node):
        raise ModLoweringError(f"the joint graph must return the score gradient and "
                               f"{len(buffers)} buffer gradients")
    flat = [outputs[0]]
    terms = []  # (gradient buffer, number of indices)
    for grad_node, grad_buffer in zip(outputs[1:], grad_buffers):
        if grad_node is None or grad_buffer is None:
            continue
        for indices, value in _scatter_terms(grad_node):
            if len(indices) != len(grad_buffer.get_size()):
                raise ModLoweringError("a buffer gradient term does not index every dim")
            if not isinstance(value, torch.fx.Node) or any(
                    not isinstance(i, torch.fx.Node) for i in indices):
                raise ModLoweringError("a buffer gradient term is not computed per score")
            flat += [value] + indices
            terms.append((grad_buffer, len(indices)))

    inputs = [_placeholder(name, dtype, device) for name, dtype in
              zip(JOINT_PLACEHOLDERS, (score_dtype,) + (torch.int32,) * 4 + (score_dtype,))]
    inputs += list(buffers)
    values = list(_lower_pointwise(_graph_of_outputs(graph_module, flat), inputs, joint.name,
                                   approx_tanh))
    for value in values:
        if not isinstance(value, ir.IRNode) or len(value.get_size()) != 0:
            raise ModLoweringError(f"{joint.name}: every joint output must be a scalar")

    grad_score = _wrap_expression(values[0], device)
    scatters = []
    position = 1
    for grad_buffer, num_indices in terms:
        value = values[position]
        indices = values[position + 1:position + 1 + num_indices]
        position += 1 + num_indices
        scatters.append(_atomic_scatter(grad_buffer, indices, value, device))
    return grad_score, scatters

