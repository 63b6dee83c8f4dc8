"""Every difference between the torch versions we support (>= 2.11) lives here."""
import torch

TORCH_VERSION = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2])
