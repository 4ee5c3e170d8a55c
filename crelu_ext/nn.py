"""torch.nn modules."""

import torch

from .functional import crelu
from .recompute import track


class CReLU(torch.nn.Module):
    """Concatenated ReLU (Shang et al., 2016): ``cat([relu(x), relu(-x)], dim)``.

    Doubles the size of ``dim``; see :func:`crelu_ext.crelu`. Scripted with
    ``torch.jit.script``, it runs the native op whatever its ``backend``.
    """

    DEFAULT_DIM = 1  # the channels of NCHW input

    def __init__(self, dim: int = DEFAULT_DIM, backend: str = "auto") -> None:
        super().__init__()
        self.dim = dim
        self.backend = backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():  # TorchScript compiles this branch alone
            return torch.ops.crelu_ext.crelu(x, self.dim, False)[0]
        return self._eager_forward(x)

    def _eager_forward(self, x: torch.Tensor) -> torch.Tensor:
        try:
            return track(x, self.dim, crelu(x, self.dim, self.backend))
        except IndexError as error:
            if self.dim != self.DEFAULT_DIM:
                raise
            raise IndexError(
                f"{error}; {self.DEFAULT_DIM} is CReLU's default dim (the channels of "
                "NCHW input): pass CReLU(dim=...) for other layouts, e.g. dim=-1 for "
                "(batch, features)"
            ) from None

    def extra_repr(self) -> str:
        return f"dim={self.dim}, backend={self.backend!r}"
