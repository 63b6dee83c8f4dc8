"""Which kernel serves an operator call: the one seam where kernel families meet.

Each operator has an ordered list of ``Candidate``s. The lowering tries them in order;
a candidate either returns its lowered outputs or raises ``Declined`` with a one-line
reason (logged at debug level: ``TORCH_LOGS="+inductor_flex"`` or the ``inductor_flex``
logger), and the next is tried. The last candidate, the extern call of the exact chunked
implementation, serves every call.

``"AUTO"`` first tries the vendor SDPA kernels (cuDNN, flash; ``vendor.py``), which serve
only calls whose block mask carries a proven full / causal pattern.

``kernel_options["BACKEND"]`` narrows the list: ``"AUTO"`` (default) tries all;
``"TRITON"`` only the fused Triton kernels; ``"TRITON_DECODE"`` only the short-query
kernel (``decode.py``). An explicit backend that cannot serve the call is an error naming the reason,
never a silent substitute. ``FORCE_USE_FLEX_ATTENTION`` keeps ``"AUTO"`` off the
short-query kernel.

To add a kernel: write its lowering (raising ``Declined`` where it does not apply), and
put a ``Candidate`` for it in ``FORWARD`` or ``BACKWARD`` at the place of its priority.
"""
import importlib
import logging
from dataclasses import dataclass
from typing import Tuple

from .options import BACKWARD as BACKWARD_PREFIX
from .options import FORWARD as FORWARD_PREFIX
from .options import PassOptions

log = logging.getLogger("inductor_flex")


class Declined(Exception):
    """A candidate does not serve this call; the message says why, in one line."""


@dataclass(frozen=True)
class Candidate:
    """One kernel family for one operator.

    ``lowering`` is ``"module.function"`` in this package, imported on first use (Inductor
    imports a lowering only when a graph holds its operator); it takes the operator's
    lowered arguments. ``backends``: the BACKEND values that select it; ``devices``: the
    device types it compiles for (empty: any); ``short_query``: it is the short-query
    kernel that FORCE_USE_FLEX_ATTENTION rules out."""
    name: str
    lowering: str
    backends: Tuple[str, ...]
    devices: Tuple[str, ...] = ()
    short_query: bool = False

    def lower(self, *args, **kwargs):
        module, function = self.lowering.rsplit(".", 1)
        package = __name__.rsplit(".", 1)[0]
        return getattr(importlib.import_module(f"{package}.{module}"), function)(*args, **kwargs)


FORWARD = (
    Candidate("split-KV Triton decode", "decode.lower_decode", ("AUTO", "TRITON_DECODE"), ("cuda",),
              short_query=True),
    # Full / causal calls an SDPA kernel computes exactly (vendor.py); BACKEND="TRITON" skips it.
    Candidate("vendor SDPA forward", "vendor.lower_forward_vendor", ("AUTO",), ("cuda",)),
    Candidate("fused Triton forward", "forward.lower_forward", ("AUTO", "TRITON"), ("cuda",)),
    Candidate("extern dense forward", "extern.lower_forward_extern", ("AUTO",)),
)
BACKWARD = (
    Candidate("vendor SDPA backward", "vendor.lower_backward_vendor", ("AUTO",), ("cuda",)),
    # The short-query forward has no backward of its own: its calls differentiate through
    # the fused backward, so TRITON_DECODE selects that too.
    Candidate("fused Triton backward", "backward.lower_backward",
              ("AUTO", "TRITON", "TRITON_DECODE"), ("cuda",)),
    Candidate("extern dense backward", "extern.lower_backward_extern", ("AUTO",)),
)


def _kernel_options_arg(args, kwargs, position: int):
    return kwargs.get("kernel_options", args[position] if len(args) > position else None)


def dispatch(candidates, options: PassOptions, device_type: str, args, kwargs):
    """Lower with the first candidate that serves the call (see the module docstring)."""
    backend = options.backend()
    force_flex = options.flag("FORCE_USE_FLEX_ATTENTION")
    reasons = []
    for candidate in candidates:
        if backend not in candidate.backends:
            continue
        if candidate.short_query and force_flex:
            reasons.append(f"{candidate.name}: FORCE_USE_FLEX_ATTENTION is set")
            continue
        if candidate.devices and device_type not in candidate.devices:
            reasons.append(f"{candidate.name}: compiles for {'/'.join(candidate.devices)}, "
                           f"not {device_type}")
            continue
        try:
            return candidate.lower(*args, **kwargs)
        except Declined as declined:
            reasons.append(f"{candidate.name}: {declined}")
            log.debug("inductor_flex: %s declined: %s", candidate.name, declined)
    raise RuntimeError(f"flex_attention: BACKEND={backend!r} cannot serve this call: "
                       + ("; ".join(reasons) or "no kernel of that family exists here"))


def lower_forward(*args, **kwargs):
    """The forward operator's lowering (arguments in docs/internals.md order)."""
    options = PassOptions(_kernel_options_arg(args, kwargs, 6), FORWARD_PREFIX)
    return dispatch(FORWARD, options, args[0].get_device().type, args, kwargs)


def lower_backward(*args, **kwargs):
    """The backward operator's lowering (arguments in docs/internals.md order)."""
    options = PassOptions(_kernel_options_arg(args, kwargs, 11), BACKWARD_PREFIX)
    return dispatch(BACKWARD, options, args[0].get_device().type, args, kwargs)
