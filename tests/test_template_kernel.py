"""lowering/template_kernel.py: strides reach the templates as single operands."""
import types

import sympy

from inductor_flex.lowering.template_kernel import FlexTemplateKernel


def kernel_with_input(strides):
    kernel = FlexTemplateKernel.__new__(FlexTemplateKernel)  # only what stride() reads
    kernel.named_input_nodes = {"X": types.SimpleNamespace(get_stride=lambda: strides)}
    kernel.get_stride_and_maybe_freeze_layout = lambda node: node.get_stride()
    kernel.rename_indexing = lambda expr: expr
    return kernel


def test_a_sum_stride_multiplies_as_a_whole():
    # A [1, 1, R + 1, C + 1] block-list tensor under dynamic shapes: strides are sums.
    # Pasted unparenthesised after "off_b *", only the first term was multiplied (wrong
    # block rows, then an illegal address, in the fused forward under dynamic=True).
    s = sympy.Symbol("ks0", integer=True, positive=True)
    kernel = kernel_with_input([(s + 1) * (s + 2), s + 2, 1])
    row_stride = kernel.stride("X", 1)
    assert eval(f"3 * {row_stride}", {"ks0": 5}) == 3 * 7
    assert eval(f"2 * {kernel.stride('X', 0)}", {"ks0": 5}) == 2 * 6 * 7


def test_all_strides_at_once_unpack_as_operands():
    s = sympy.Symbol("ks0", integer=True, positive=True)
    kernel = kernel_with_input([s + 3, 1])
    first, second = eval(kernel.stride("X"), {"ks0": 4})
    assert (first, second) == (7, 1)
    assert eval(f"2 * {kernel.stride('X').split(', ')[0]}", {"ks0": 4}) == 14
