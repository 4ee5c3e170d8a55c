"""torch.nn modules."""

import torch

from .functional import DEFAULT_DIM, crelu


class CReLU(torch.nn.Module):
    """Concatenated ReLU (Shang et al., 2016): ``cat([relu(x), relu(-x)], dim)``.

    Doubles the size of ``dim``; see :func:`crelu_ext.crelu`. An input with no
    dim 1, the default, gets an IndexError that says so.
    """

    DEFAULT_DIM = DEFAULT_DIM

    def __init__(self, dim: int = DEFAULT_DIM, backend: str = "auto") -> None:
        super().__init__()
        self.dim = dim
        self.backend = backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return crelu(x, self.dim, self.backend)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, backend={self.backend!r}"
