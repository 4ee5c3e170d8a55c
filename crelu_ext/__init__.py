"""crelu_ext: CReLU (Shang et al., ICML 2016) as a fast, exact, fused torch op.

y = crelu_ext.crelu(x, dim=1)        # == cat([relu(x), relu(-x)], dim=1)
m = crelu_ext.CReLU(dim=1)
"""

from . import _export, reference  # noqa: F401  (_export: torch.onnx.export exports the ops)
from .functional import available_backends, crelu, register_backend, set_default_backend
from .fuse import fuse
from .nn import CReLU

__version__ = "0.1.0"
__all__ = [
    "CReLU",
    "available_backends",
    "crelu",
    "fuse",
    "reference",
    "register_backend",
    "set_default_backend",
]
