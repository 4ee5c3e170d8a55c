"""torch.nn modules."""

import torch

from .functional import crelu


class CReLU(torch.nn.Module):
    """Concatenated ReLU (Shang et al., 2016): ``cat([relu(x), relu(-x)], dim)``.

    Doubles the size of ``dim``; see :func:`crelu_ext.crelu`.
    """

    DEFAULT_DIM = 1  # the channels of NCHW input

    def __init__(self, dim: int = DEFAULT_DIM, backend: str = "auto") -> None:
        super().__init__()
        self.dim = dim
        self.backend = backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        try:
            return crelu(x, self.dim, self.backend)
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
