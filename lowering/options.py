"""Kernel options as the lowerings read them: one reader, one table of keys.

``flex_attention`` hands the lowerings the user's ``kernel_options`` with upper-cased keys
(``api._kernel_options``). A pass reads ``<PASS>_<KEY>`` before ``<KEY>``: ``FWD_`` for
the forward kernels, ``BWD_`` for the backward; the other pass's prefix is not its
business. ``KEYS`` says, for every key ``FlexKernelOptions`` declares, who reads it or why
nothing does; a test holds the two in step.

Plain Python: the api validates ``BACKEND`` with it before anything is traced.
"""
from typing import Mapping, Optional

FORWARD = "FWD_"
BACKWARD = "BWD_"

# Every FlexKernelOptions key (without a pass prefix) -> what reads it.
KEYS = {
    "BLOCK_M": "forward tile rows (configs.select_forward_configs)",
    "BLOCK_N": "forward and decode tile keys (configs.select_forward_configs, select_decode_config)",
    "BLOCK_M1": "backward dK/dV tile query rows (configs.select_backward_configs)",
    "BLOCK_N1": "backward dK/dV tile keys (configs.select_backward_configs)",
    "BLOCK_M2": "backward dQ tile query rows (configs.select_backward_configs)",
    "BLOCK_N2": "backward dQ tile keys (configs.select_backward_configs)",
    "NUM_WARPS": "both passes' launch (configs)",
    "NUM_STAGES": "both passes' launch (configs)",
    "PRESCALE_QK": "forward: scale q once per tile (forward.py)",
    "ROWS_GUARANTEED_SAFE": "forward: skip the empty-row guards (forward.py)",
    "BLOCKS_ARE_CONTIGUOUS": "forward: walk listed blocks without reading indices (forward.py)",
    "USE_TMA": "both passes: tiles through the TMA where layouts allow (forward.py, backward.py)",
    "EARLY_DP": "backward: dO v^T before the exponentials on full blocks (backward.py)",
    "APPROX_TANH": "both passes: the hardware tanh in half precision (forward.py, backward.py)",
    "WARP_SPECIALIZE": "forward: Triton's warp specialization of the KV loop (forward.py)",
    "BACKEND": "which kernel family serves the call (dispatch.py)",
    "FORCE_USE_FLEX_ATTENTION": "never the short-query kernel (dispatch.py)",
    "SPLIT_KV": "short-query kernel: programs per row's KV blocks (decode.py; default from the SM count)",
    # Accepted so that code written for PyTorch runs unchanged, and ignored:
    "WRITE_DQ": "ignored: the fused backward adds buffer gradients in its dK/dV programs",
    "KPACK": "ignored: AMD tile knob; no ROCm kernels here",
    "MATRIX_INSTR_NONKDIM": "ignored: AMD tile knob; no ROCm kernels here",
    "WAVES_PER_EU": "ignored: AMD tile knob; no ROCm kernels here",
}

# BACKEND values, as PyTorch spells them. "FLASH" (PyTorch's CuTe kernels) is accepted as a
# value and refused as a choice: this package has no such kernel.
BACKENDS = ("AUTO", "TRITON", "TRITON_DECODE", "FLASH")


class PassOptions:
    """The kernel options as one pass sees them: keys matched without regard to case,
    ``<prefix><KEY>`` over ``<KEY>``, an explicit ``None`` read as unset."""

    def __init__(self, kernel_options: Optional[Mapping], prefix: str):
        self._options = {str(k).upper(): v for k, v in (kernel_options or {}).items()}
        self.prefix = prefix.upper()

    def lookup(self, name: str):
        """``(key, value)`` of the setting that applies to ``name``, or ``(None, None)``."""
        for key in (self.prefix + name.upper(), name.upper()):
            value = self._options.get(key)
            if value is not None:
                return key, value
        return None, None

    def get(self, name: str, default=None):
        _, value = self.lookup(name)
        return default if value is None else value

    def flag(self, name: str, default: bool = False) -> bool:
        return bool(self.get(name, default))

    def backend(self) -> str:
        return self.get("BACKEND", "AUTO")


def check_backend(kernel_options: Mapping) -> None:
    """Reject a BACKEND value PyTorch would reject (as each pass reads it, ``FWD_``/``BWD_``
    included), and BACKEND together with the legacy FORCE_USE_FLEX_ATTENTION (two answers
    to one question), before any tracing."""
    for prefix in (FORWARD, BACKWARD):
        options = PassOptions(kernel_options, prefix)
        key, backend = options.lookup("BACKEND")
        if backend is None:
            continue
        if backend not in BACKENDS:  # case-sensitive, as PyTorch
            raise ValueError(f"flex_attention: kernel option {key}={backend!r} is not one of "
                             f"{BACKENDS}")
        if options.flag("FORCE_USE_FLEX_ATTENTION"):
            raise RuntimeError("flex_attention: kernel options BACKEND and FORCE_USE_FLEX_ATTENTION "
                               "cannot be combined; BACKEND supersedes it (use BACKEND='TRITON')")
