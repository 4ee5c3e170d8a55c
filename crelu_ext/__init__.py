"""crelu_ext: CReLU (Shang et al., ICML 2016) as a fast, exact, fused torch op.

y = crelu_ext.crelu(x, dim=1)        # == cat([relu(x), relu(-x)], dim=1)
m = crelu_ext.CReLU(dim=1)
model = crelu_ext.fuse(model)        # hand-written CReLU idioms -> the fused op, in place
with crelu_ext.recompute():          # layers after CReLU keep its input, not its output
    loss = model(x)
"""

import warnings as _warnings

with _warnings.catch_warnings():
    # Importing torch without numpy, which neither torch nor crelu_ext needs, makes
    # torch (2.14) warn "Failed to initialize NumPy: No module named 'numpy'" once
    # per process; where crelu_ext is what imports torch, that warning is left out.
    # A numpy that is installed but fails to load still gets torch's warning.
    _warnings.filterwarnings(
        "ignore", r"Failed to initialize NumPy: No module named 'numpy'", UserWarning
    )
    import torch as _torch  # noqa: F401

from . import _export, reference  # noqa: F401  (_export: torch.onnx.export exports the ops)
from .functional import available_backends, crelu, register_backend, set_default_backend
from .fuse import fuse
from .nn import CReLU
from .recompute import recompute

__version__ = "0.1.0"
__all__ = [
    "CReLU",
    "available_backends",
    "crelu",
    "fuse",
    "recompute",
    "reference",
    "register_backend",
    "set_default_backend",
]
