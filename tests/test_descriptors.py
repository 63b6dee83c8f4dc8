"""Host-built TMA descriptors (lowering/descriptors.py), the parts that need no GPU: the
kernel signature the descriptor arguments get, the tile each choice declares, and
autotuning's stand-in descriptor. The kernels that use them run in tests/gpu."""
from types import SimpleNamespace

import pytest
import torch
from torch._inductor import ir
from torch._inductor.codegen.common import TensorArg, TMADescriptorArg
from torch._inductor.codegen.triton_utils import signature_to_meta
from torch._inductor.virtualized import V

from inductor_flex.lowering.descriptors import (
    _TRITON_LAUNCHED, HeadTileDescriptor, _DescriptorArgs, descriptor_input_generators,
    example_descriptor, strides_describable)


def _graph():
    """A graph to lower in: nothing in it but the buffers the tests name."""
    from torch._inductor.graph import GraphLowering

    return GraphLowering(torch.fx.symbolic_trace(lambda x: x))


def _buffer(graph, name, dtype, size, stride):
    buffer = ir.Buffer(name=name, layout=ir.FixedLayout(torch.device("cpu"), dtype, size, stride))
    graph.name_to_buffer[name] = buffer
    return buffer


def _argdefs(descriptor_tiles):
    graph = _graph()
    with V.set_graph_handler(graph):
        for name, dtype in (("buf0", torch.bfloat16), ("buf1", torch.float32), ("buf7", torch.bfloat16)):
            _buffer(graph, name, dtype, [2, 3, 5, 16], [240, 80, 16, 1])
        args = _DescriptorArgs()
        args.input_buffers.update({"buf0": "arg_Q", "buf1": "arg_LSE", "buf7": "arg_Q_DESC"})
        args.descriptor_tiles = descriptor_tiles
        arg_defs, call_args, signature, arg_types = args.python_argdefs()
        meta = signature_to_meta(signature, size_dtype="tl.int32", argdefs=arg_defs, is_template=True)
    return call_args, signature, meta


def test_descriptor_buffers_are_declared_tensor_descriptors():
    call_args, signature, meta = _argdefs({"buf7": [1, 1, 64, 128]})
    assert call_args == ["buf0", "buf1", "buf7"]  # the wrapper passes the descriptor itself
    assert isinstance(signature[0], TensorArg) and isinstance(signature[1], TensorArg)
    assert signature[2] == TMADescriptorArg(name="arg_Q_DESC", api_type="stable",
                                            block_shape=[1, 1, 64, 128], dtype=torch.bfloat16)
    assert meta == {"arg_Q": "*bf16", "arg_LSE": "*fp32",
                    "arg_Q_DESC": "tensordesc<bf16[1, 1, 64, 128]>"}


def test_without_descriptors_the_arguments_are_unchanged():
    _, signature, _ = _argdefs({})
    assert all(isinstance(arg, TensorArg) for arg in signature)


def test_each_choice_declares_its_own_tile():
    # The same IR node, two choices' constants: the tile follows the choice.
    node = SimpleNamespace(tile_constants=("BLOCK_M1", "QK_HEAD_DIM_ROUNDED"))
    tile = HeadTileDescriptor.tile
    assert tile(node, {"BLOCK_M1": 64, "QK_HEAD_DIM_ROUNDED": 128}) == [1, 1, 64, 128]
    assert tile(node, {"BLOCK_M1": 32, "QK_HEAD_DIM_ROUNDED": 64}) == [1, 1, 32, 64]


def test_autotuning_stand_in_is_a_tensor_and_reads_as_a_descriptor():
    # Inductor's autotuner makes, measures and restrides tensors; Triton's launcher reads a
    # descriptor's base, shape, strides and padding. The stand-in answers both.
    graph = _graph()
    with V.set_graph_handler(graph):
        tensor = _buffer(graph, "buf3", torch.bfloat16, [2, 3, 5, 16], [240, 80, 16, 1])
        example = example_descriptor(SimpleNamespace(tensor=tensor))
    assert isinstance(example, torch.Tensor) and example.dtype == torch.bfloat16
    assert tuple(example.shape) == (2, 3, 5, 16) and example.stride() == (240, 80, 16, 1)
    assert example.base is example and example.data_ptr() == example.base.data_ptr()
    assert example.strides == [240, 80, 16, 1] and example.padding == "zero"
    assert not example.is_mkldnn
    assert torch.as_strided(example, (2, 3, 5, 16), (240, 80, 16, 1), 0).shape == (2, 3, 5, 16)


def test_descriptor_generators_stand_after_the_other_inputs():
    generators = descriptor_input_generators(12, ["q", "do", "k", "v"])
    assert sorted(generators) == [12, 13, 14, 15]
    assert set(generators.values()) == {example_descriptor}
    assert descriptor_input_generators(12, []) == {}


def test_stand_in_for_a_view_is_the_view():
    # A descriptor describes the view it was built on (here [2, 3, 5, 16] heads-second over
    # a [2, 5, 48] buffer), so its stand-in must have the view's sizes and strides.
    graph = _graph()
    with V.set_graph_handler(graph):
        base = _buffer(graph, "buf4", torch.bfloat16, [2, 5, 48], [240, 48, 1])
        view = ir.ReinterpretView(data=base, layout=ir.FixedLayout(
            torch.device("cpu"), torch.bfloat16, [2, 3, 5, 16], [240, 16, 48, 1]))
        example = example_descriptor(SimpleNamespace(tensor=view))
    assert tuple(example.shape) == (2, 3, 5, 16) and example.strides == [240, 16, 48, 1]


def test_an_expanded_dim_is_not_described():
    graph = _graph()
    with V.set_graph_handler(graph):
        dense = _buffer(graph, "buf5", torch.bfloat16, [2, 3, 5, 16], [240, 80, 16, 1])
        expanded = _buffer(graph, "buf6", torch.bfloat16, [2, 3, 5, 16], [0, 80, 16, 1])
        assert strides_describable([dense])
        assert not strides_describable([dense, expanded])


def test_kernels_with_descriptors_are_marked_for_tritons_launcher():
    # The text put above the template decorator in the kernel's module: valid Python that
    # marks the autotuner as a user-written kernel's (Inductor's static launcher, which
    # cannot pass descriptors, then leaves it to Triton's).
    from torch._inductor.runtime import triton_heuristics
    from torch._inductor.runtime.hints import HeuristicType

    namespace = {"triton_heuristics": triton_heuristics}
    exec(_TRITON_LAUNCHED + "def kernel():\n    pass\n", namespace)
    assert namespace["kernel"].heuristic_type == HeuristicType.USER_AUTOTUNE



@pytest.mark.parametrize("torch_2_11", [False, True], ids=["this_torch", "without_the_name_helper"])
def test_tma_only_for_a_provably_aligned_base_pointer(monkeypatch, torch_2_11):
    # A graph input's storage offset is inside its data pointer, not in its layout: the
    # layout alone looks aligned. Inductor records inputs whose example was unaligned.
    from inductor_flex.lowering.common import tma_compatible

    if torch_2_11:  # torch 2.11 has no is_unaligned_buffer_name: _compat reads the facts itself
        from torch._inductor.codegen import triton_utils
        monkeypatch.delattr(triton_utils, "is_unaligned_buffer_name", raising=False)
    graph = _graph()
    with V.set_graph_handler(graph):
        aligned = _buffer(graph, "buf8", torch.float16, [2, 4, 256, 64], [65536, 16384, 64, 1])
        unaligned = _buffer(graph, "buf9", torch.float16, [2, 4, 256, 64], [65536, 16384, 64, 1])
        graph.unaligned_buffers.add("buf9")
        row_stride = _buffer(graph, "buf10", torch.float16, [2, 4, 256, 64], [66560, 16640, 65, 1])
        view = ir.ReinterpretView(data=aligned, layout=ir.FixedLayout(
            torch.device("cpu"), torch.float16, [2, 4, 256, 64], [65536, 16384, 64, 1], offset=997))
        assert tma_compatible(aligned)
        assert not tma_compatible(unaligned)
        assert not tma_compatible(row_stride)
        assert not tma_compatible(view)
