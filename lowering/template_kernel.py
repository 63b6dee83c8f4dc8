"""The TritonTemplateKernel our templates render with.

Templates multiply offsets by strides (``off_b * {{stride("LSE", 0)}}``). Under dynamic
shapes a stride is a symbolic expression and can be a sum (a tensor of shape
``[1, 1, R + 1, C + 1]`` has row stride ``1 + ceil(S / 128)``); pasted as text after a
``*``, only its first term would be multiplied. Every stride is therefore rendered as one
parenthesised operand.
"""
from torch._inductor.select_algorithm import TritonTemplateKernel


class FlexTemplateKernel(TritonTemplateKernel):
    def stride(self, name, index=None):
        if isinstance(index, int):
            return f"({super().stride(name, index)})"
        node = self.output_node if name is None else self.named_input_nodes[name]
        return ", ".join(f"({super(FlexTemplateKernel, self).stride(name, i)})"
                         for i in range(len(node.get_stride())))
