"""Host-built TMA descriptors for the tiles a template streams through its inner loops.

Why: a descriptor built inside the kernel (``tl.make_tensor_descriptor``) lives in global
scratch memory that Triton allocates for every launch, 128 bytes per descriptor per
program. The backward at B=1 H=16 S=32768 runs 16384 programs of four descriptors: 8 MiB
held while it runs, above PyTorch FlexAttention's peak. A descriptor built on the host
(Triton's ``TensorDescriptor``) is a kernel parameter instead: nothing is allocated, and no
program encodes one or fences it.

One descriptor covers a whole ``[batch, heads, rows, head_dim]`` tensor with a
``[1, 1, ROWS, COLS]`` tile: a program names its head by coordinates
(``load_head_rows`` in ``common.py.jinja``) and the TMA zero-fills rows past the sequence
and columns past the head dim, per head.

Inductor passes host descriptors to user-written Triton kernels (``ir.TMADescriptorStable``,
``TMADescriptorArg``) but not to templates. Three pieces add that:

- ``HeadTileDescriptor``: the IR node; the wrapper builds the descriptor before the launch.
- ``DescriptorTemplateKernel``: the template kernel that declares those arguments as
  ``tensordesc<dtype[1, 1, ROWS, COLS]>``, with the tile of the choice it renders (Triton's
  launcher takes the tile from the compiled kernel, so one descriptor serves every choice),
  and has Triton's launcher run it.
- ``example_descriptor``: what autotuning passes in a descriptor's place when it times
  several choices. (Inductor's optional kernel-benchmark harnesses, ``benchmark_kernel``
  and ``benchmark_fusion``, make plain tensors for every argument: they cannot run these
  kernels.)
"""
import textwrap
from typing import Sequence

import torch
from torch._inductor import ir
from torch._inductor.codegen.common import KernelArgs, TensorArg, TMADescriptorArg
from torch._inductor.virtualized import V

from .template_kernel import FlexTemplateKernel


class HeadTileDescriptor(ir.TMADescriptorStable):
    """A host descriptor over a 4-D attention tensor whose tile is ``[1, 1, meta[rows],
    meta[cols]]`` for the template constants ``rows`` and ``cols`` of each choice.

    ``nominal_rows`` / ``nominal_cols`` only satisfy the host object's checks (powers of 2):
    the launcher encodes the tile the compiled kernel declares."""

    def __init__(self, tensor, rows: str, cols: str, nominal_rows: int, nominal_cols: int):
        super().__init__(tensor, [1, 1, nominal_rows, nominal_cols])
        self.tile_constants = (rows, cols)

    def tile(self, meta) -> list:
        rows, cols = self.tile_constants
        return [1, 1, int(meta[rows]), int(meta[cols])]


def head_tile_descriptor(node, rows: str, cols: str, meta) -> HeadTileDescriptor:
    """The descriptor IR for a realized attention tensor ``node``, tiled by the template
    constants ``rows`` x ``cols`` (nominal tile from ``meta``, one choice's constants)."""
    tensor = ir.InputsKernel.unwrap_storage_for_input(ir.ExternKernel.realize_input(node))
    return HeadTileDescriptor(tensor, rows, cols, int(meta[rows]), int(meta[cols]))


class _DescriptorArgs(KernelArgs):
    """Kernel arguments in which some input buffers are host descriptors: their signature
    entry says ``tensordesc<...>`` instead of a pointer (Triton's launcher then turns the
    descriptor into a ``CUtensorMap`` parameter)."""

    descriptor_tiles: dict  # descriptor buffer name -> block shape (set by the kernel)

    def python_argdefs(self):
        arg_defs, call_args, signature, arg_types = super().python_argdefs()
        signature = [
            TMADescriptorArg(name=arg.name, api_type="stable",
                             block_shape=self.descriptor_tiles[arg.buffer], dtype=arg.dtype)
            if isinstance(arg, TensorArg) and arg.buffer in self.descriptor_tiles else arg
            for arg in signature
        ]
        return arg_defs, call_args, signature, arg_types


class DescriptorTemplateKernel(FlexTemplateKernel):
    """A template kernel whose ``HeadTileDescriptor`` inputs are host descriptors."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        tiles = {node.get_name(): node.tile(self.meta)
                 for node in self.input_nodes if isinstance(node, HeadTileDescriptor)}
        self.args.__class__ = _DescriptorArgs  # the same arguments, descriptor-aware
        self.args.descriptor_tiles = tiles

    def jit_lines(self):
        lines = textwrap.dedent(super().jit_lines())
        if not self.args.descriptor_tiles:
            return lines
        decorator = "@triton_heuristics.template("
        assert decorator in lines, lines
        return lines.replace(decorator, _TRITON_LAUNCHED + decorator, 1)

    def call_kernel(self, name, node=None, *args, **kwargs):
        if self.args.descriptor_tiles:
            # The wrapper builds the descriptors with triton.tools.tensor_descriptor, which
            # `import triton` alone does not load.
            V.graph.wrapper_code.add_import_once("import triton.tools.tensor_descriptor")
        return super().call_kernel(name, node, *args, **kwargs)


# Put above the kernel's template decorator: Inductor's static launcher cannot pass a
# descriptor (it has no entry for "tensordesc<...>": a KeyError in torch 2.11 and 2.13) and
# leaves kernels marked as user-written to Triton's launcher, which encodes one. The mark
# decides nothing else (templates and user kernels alike skip coordinate-descent tuning).
# Defined in the kernel's own module, so compile workers import nothing more.
_TRITON_LAUNCHED = """\
def _launched_by_triton(autotuner):
    autotuner.heuristic_type = triton_heuristics.HeuristicType.USER_AUTOTUNE
    return autotuner


@_launched_by_triton
"""


def host_descriptors_usable(tensors) -> bool:
    """Whether ``tensors`` (realized IR) can come as host-built descriptors: Triton has
    them, the static launcher is not forced on kernels marked as user-written (the way
    around it above), and their strides suit a descriptor (``strides_describable``)."""
    from torch._inductor import config

    from inductor_flex import _compat

    return (_compat.triton_has_host_tensor_descriptors()
            and not getattr(config, "static_launch_user_defined_triton_kernels", False)
            and strides_describable(tensors))


def strides_describable(tensors) -> bool:
    """No outer stride is 0 (an expanded dim): Triton checks only that strides are
    multiples of 16, and the driver's encoder is not known to take 0."""
    statically_known_gt = V.graph.sizevars.statically_known_gt
    return all(statically_known_gt(stride, 0)
               for x in tensors for stride in x.get_stride()[:-1])


class _ExampleDescriptor(torch.Tensor):
    """Autotuning's stand-in for a host descriptor: a random tensor, which is what
    Inductor's autotuner makes and copies, that also answers what Triton's launcher reads of
    a descriptor (``base``, ``shape``, ``strides``, ``padding``)."""

    padding = "zero"

    @property
    def base(self):
        return self

    @property
    def strides(self):
        return list(self.stride())


def example_descriptor(node: HeadTileDescriptor):
    """Autotuning input for a descriptor (``input_gen_fns``): random data shaped and
    strided as the described tensor."""
    from torch._inductor.select_algorithm import AlgorithmSelectorCache

    # The described tensor's own layout: a view's example must be the view, not its base.
    example = AlgorithmSelectorCache.benchmark_example_value(node.tensor.get_layout())
    return example.as_subclass(_ExampleDescriptor)


def descriptor_input_generators(first_position: int, descriptors: Sequence) -> dict:
    """``input_gen_fns`` entries for descriptors standing from ``first_position`` on."""
    return {first_position + i: example_descriptor for i in range(len(descriptors))}
