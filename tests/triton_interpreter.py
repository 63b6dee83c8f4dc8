"""Run Inductor's Triton templates on CPU tensors through Triton's interpreter.

Import this module first thing in a fresh process started with ``TRITON_INTERPRET=1``
(``tests/test_interpreter.py`` does). It makes Inductor generate Triton for CPU
tensors, lets the CUDA-only kernel candidates (forward and backward) lower for the CPU (as an sm_90 GPU with 4
SMs, so the decode kernel splits its KV blocks), and fills three gaps of the interpreter
(Triton 3.6): no active driver to hash, scalars loaded as one-element arrays where a
Python int is needed (``range`` bounds), and no libdevice (exp2, log2, tanh of the
generated kernels). Numerics are the interpreter's (numpy), so this checks the kernels'
indexing and logic, not their GPU speed or code generation.
"""
import dataclasses

import numpy as np
import torch
import torch._inductor.config as inductor_config
import torch.utils._triton as torch_triton
import triton.language as tl
import triton.runtime.interpreter as interpreter
from torch._inductor.runtime import triton_helpers
from triton.backends.compiler import GPUTarget

inductor_config.cpu_backend = "triton"
torch_triton.triton_hash_with_backend = lambda: "interpreter"
torch_triton.triton_backend = lambda: GPUTarget("cuda", 90, 32)

_patch_lang_tensor = interpreter._patch_lang_tensor


def _patch_tensor(tensor, scope):
    _patch_lang_tensor(tensor, scope)
    scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))


interpreter._patch_lang_tensor = _patch_tensor


def _numpy_elementwise(function):
    def apply(x):
        return tl.core.tensor(interpreter.TensorHandle(function(x.handle.data), x.handle.dtype), x.type)
    return apply


triton_helpers.libdevice.exp2 = _numpy_elementwise(np.exp2)
triton_helpers.libdevice.log2 = _numpy_elementwise(np.log2)
triton_helpers.libdevice.tanh = _numpy_elementwise(np.tanh)

import inductor_flex  # noqa: E402
from inductor_flex.lowering import decode, dispatch  # noqa: E402

dispatch.FORWARD = tuple(dataclasses.replace(c, devices=()) for c in dispatch.FORWARD)
dispatch.BACKWARD = tuple(dataclasses.replace(c, devices=()) for c in dispatch.BACKWARD)
torch.cuda.get_device_capability = lambda *args, **kwargs: (9, 0)
decode.multiprocessor_count = lambda device: 4
