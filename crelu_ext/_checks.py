"""Input checks, mirroring csrc/ops.cpp for the Python side (the reference,
the fake kernels, the Triton backend)."""

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_input(x: torch.Tensor, dim: int, op: str = "crelu") -> int:
    """Raises a clear error naming ``crelu_ext.<op>`` for input the op does not
    take; returns ``dim`` wrapped to ``[0, x.dim())``."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"crelu_ext.{op}: expected a torch.Tensor, got {type(x).__name__}")
    if x.layout != torch.strided:  # sparse (COO, CSR, ...) or mkldnn
        raise TypeError(
            f"crelu_ext.{op}: expected a dense (strided) tensor, got layout {x.layout}; "
            "convert it with .to_dense()"
        )
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"crelu_ext.{op}: expected a float16, bfloat16, float32 or float64 tensor, "
            f"got {x.dtype}"
        )
    if x.dim() == 0:
        raise RuntimeError(
            f"crelu_ext.{op}: a zero-dimensional tensor cannot be concatenated; "
            "give it at least one dimension"
        )
    if not isinstance(dim, int) or isinstance(dim, bool):
        raise TypeError(f"crelu_ext.{op}: dim must be an int, got {type(dim).__name__}")
    if not -x.dim() <= dim < x.dim():
        raise IndexError(
            f"crelu_ext.{op}: dim {dim} is out of range for a {x.dim()}-D tensor "
            f"(expected it in [{-x.dim()}, {x.dim() - 1}])"
        )
    return dim % x.dim()
