"""Neighbourhood attention (NATTEN) over an image flattened row-major.

Position ``p`` is pixel ``(p // width, p % width)``. A pixel attends to the
``kernel_h x kernel_w`` window around it; near the border the window slides inwards so it
keeps its full size (it is never cut). Kernel 3 x 3 on a 4 x 4 image, the window of the
corner pixel (0, 0) and of pixel (1, 2)::

    pixel (0, 0)     pixel (1, 2)
    █ █ █ ·          · █ █ █
    █ █ █ ·          · █ █ █
    █ █ █ ·          · █ █ █
    · · · ·          · · · ·

As a mask over the 16 flattened positions it is banded with gaps: the row of query
``p`` holds up to ``kernel_h`` runs of ``kernel_w`` keys. Use Q_LEN = KV_LEN = height * width.
"""
from typing import Tuple, Union

from torch import Tensor

from ._checks import positive_int

__all__ = ["generate_natten_mask"]


def generate_natten_mask(height: int, width: int, kernel_size: Union[int, Tuple[int, int]]):
    """mask_mod of 2-D neighbourhood attention with an odd ``kernel_size`` (int or (kh, kw))."""
    fn = "generate_natten_mask"
    positive_int(fn, "height", height)
    positive_int(fn, "width", width)
    kernel_h, kernel_w = (kernel_size, kernel_size) if isinstance(kernel_size, int) else tuple(kernel_size)
    for name, size, limit in (("kernel height", kernel_h, height), ("kernel width", kernel_w, width)):
        positive_int(fn, name, size)
        if size % 2 == 0:
            raise ValueError(f"{fn}: {name} must be odd (a window centred on the pixel), got {size}")
        if size > limit:
            raise ValueError(f"{fn}: {name} {size} exceeds the image size {limit}")
    reach_h, reach_w = kernel_h // 2, kernel_w // 2

    def natten_mask(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        q_row, q_col = q_idx // width, q_idx % width
        kv_row, kv_col = kv_idx // width, kv_idx % width
        # Window centre, moved inwards so the whole window fits in the image.
        centre_row = q_row.clamp(reach_h, height - 1 - reach_h)
        centre_col = q_col.clamp(reach_w, width - 1 - reach_w)
        return ((centre_row - kv_row).abs() <= reach_h) & ((centre_col - kv_col).abs() <= reach_w)

    natten_mask.__name__ = f"natten_{height}x{width}_k{kernel_h}x{kernel_w}"
    return natten_mask
