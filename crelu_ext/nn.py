"""torch.nn modules."""

import torch

from .functional import DEFAULT_DIM, call_backend, check_backend_name
from .recompute import track


class CReLU(torch.nn.Module):
    """Concatenated ReLU (Shang et al., 2016): ``cat([relu(x), relu(-x)], dim)``.

    Doubles the size of ``dim``; see :func:`crelu_ext.crelu`. An input with no
    dim 1, the default, gets an IndexError that says so. Scripted with
    ``torch.jit.script``, it runs the native op whatever its ``backend``. An
    unknown ``backend`` fails here, with the error ``crelu`` gives for it.
    """

    def __init__(self, dim: int = DEFAULT_DIM, backend: str = "auto") -> None:
        super().__init__()
        check_backend_name(backend)
        self.dim = dim
        self.backend = backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():  # TorchScript compiles this branch alone
            return torch.ops.crelu_ext.crelu(x, self.dim, False)[0]
        # TorchScript compiles none of what follows. Inside crelu_ext.recompute(),
        # the output is recorded for its pack hook.
        return track(x, self.dim, call_backend(x, self.dim, self.backend))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, backend={self.backend!r}"
