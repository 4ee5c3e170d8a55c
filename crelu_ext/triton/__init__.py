"""The Triton backend: the kernels registered as ``torch.ops.crelu_ext.triton_*``."""

from .ops import TRITON_IMPORT_ERROR, crelu, triton_available

__all__ = ["TRITON_IMPORT_ERROR", "crelu", "triton_available"]
