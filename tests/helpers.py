"""Shared test helpers: inputs with special values, bitwise comparison, layouts."""

import re
import textwrap
from pathlib import Path

import pytest
import torch

import crelu_ext
from crelu_ext.testing import emulated

# The CUDA kernels run on the host, as backends that only the tests see.
EMULATED_BACKENDS = emulated.register_backends()

INT_VIEW = {2: torch.int16, 4: torch.int32, 8: torch.int64}

# The (backend, device) pairs that run on this machine, and only those: tests
# reach each through crelu_ext.crelu(x, dim, backend=...). On the CPU: native,
# reference, triton in Triton's interpreter (a session with TRITON_INTERPRET=1:
# `TRITON_INTERPRET=1 pytest -k triton-cpu`), and the CUDA kernels run on the
# host (emulated, emulated64: crelu_ext/testing/emulated.py) when the build has
# them; on CUDA, when there is a device. conftest.py fails the session when a
# required build is missing, so nothing required is left out silently.
DEVICES = ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]
BACKEND_DEVICES = [(b, d) for d in DEVICES for b in crelu_ext.available_backends(d)]

# Each backend's forward op in torch.ops.crelu_ext; the reference is the composition.
FORWARD_OPS = {
    "native": "crelu",
    "triton": "triton_crelu",
    "emulated": "emulated_crelu",
    "emulated64": "emulated64_crelu",
}


def unsupported(backend: str, device: str, dtype: torch.dtype) -> bool:
    """Triton's interpreter (CPU tensors) emulates kernels with numpy, which has
    no bfloat16."""
    return backend == "triton" and device == "cpu" and dtype == torch.bfloat16


def _marks(device: str) -> list:
    return [pytest.mark.cuda] if device == "cuda" else []


def backend_devices(include=None) -> list:
    """pytest params ``(backend, device)`` with ids ``backend-device``, for
    BACKEND_DEVICES or those that ``include(backend, device)`` accepts."""
    return [
        pytest.param((b, d), id=f"{b}-{d}", marks=_marks(d))
        for b, d in BACKEND_DEVICES
        if include is None or include(b, d)
    ]


def backend_devices_and_dtypes(dtypes, include=None) -> list:
    """pytest params ``(backend, device), dtype`` for ``("backend_device", "dtype")``:
    those of :func:`backend_devices` times ``dtypes``, less what a backend
    cannot compute (see :func:`unsupported`)."""
    return [
        pytest.param((b, d), dtype, id=f"{b}-{d}-{dtype}", marks=_marks(d))
        for b, d in BACKEND_DEVICES
        if include is None or include(b, d)
        for dtype in dtypes
        if not unsupported(b, d, dtype)
    ]


def special_values(dtype: torch.dtype) -> list[float]:
    info = torch.finfo(dtype)
    return [0.0, -0.0, float("inf"), -float("inf"), float("nan"), info.tiny * info.eps,
            -info.tiny * info.eps, info.tiny, info.max, -info.max, 1.0, -1.0]  # fmt: skip


def make_input(shape, dtype, device="cpu", seed=0, special_fraction=0.25) -> torch.Tensor:
    """Gaussian values with about `special_fraction` of them replaced by
    +-0, +-inf, NaN, subnormals and +-max."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    specials = torch.tensor(special_values(dtype), dtype=torch.float64)
    pick = torch.randint(len(specials), shape, generator=gen)
    where = torch.rand(shape, generator=gen) < special_fraction
    x = torch.where(where, specials[pick], x)
    return x.to(dtype).to(device)


def assert_bitwise_equal(actual: torch.Tensor, expected: torch.Tensor, what: str = "") -> None:
    """Equal shape, dtype and bits, except that NaNs need only share positions."""
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    a, e = actual.detach().cpu(), expected.detach().cpu()
    a_nan, e_nan = torch.isnan(a), torch.isnan(e)
    assert torch.equal(a_nan, e_nan), f"{what}: NaN positions differ"
    bits = INT_VIEW[a.element_size()]
    a_bits = a.contiguous().view(bits)
    e_bits = e.contiguous().view(bits)
    differ = (a_bits != e_bits) & ~e_nan
    if differ.any():
        i = differ.nonzero()[0].tolist()
        raise AssertionError(
            f"{what}: {int(differ.sum())} elements differ, first at {i}: "
            f"{a[tuple(i)].item()!r} != {e[tuple(i)].item()!r}"
        )


def crelu_and_grad(x: torch.Tensor, dim: int, grad: torch.Tensor, backend: str):
    x = x.detach().clone().requires_grad_(True)
    if backend == "reference":
        out = crelu_ext.reference.crelu(x, dim)
    else:
        out = crelu_ext.crelu(x, dim, backend=backend)
    (grad_x,) = torch.autograd.grad(out, x, grad)
    return out, grad_x


# Layouts: each maps a freshly made contiguous tensor to the layout under test.
def channels_last(t):
    return t.to(memory_format=torch.channels_last) if t.dim() == 4 else None


def channels_last_3d(t):
    return t.to(memory_format=torch.channels_last_3d) if t.dim() == 5 else None


def transposed(t):
    return t.transpose(0, -1) if t.dim() >= 2 else None


def sliced(t):
    return t[..., ::2]


def expanded(t):
    return t[:1].expand(3, *t.shape[1:]) if t.dim() >= 2 and t.shape[0] > 0 else None


def storage_offset(t):
    # One element in: misaligned for every vector width.
    flat = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
    flat[1:] = t.reshape(-1)
    return flat[1:].view(t.shape)


LAYOUTS = {
    "contiguous": lambda t: t,
    "channels_last": channels_last,
    "channels_last_3d": channels_last_3d,
    "transposed": transposed,
    "sliced": sliced,
    "expanded": expanded,
    "storage_offset": storage_offset,
}


def readme_example(section: str) -> str:
    """The first Python code block of the README's ``## section``."""
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    body = readme.split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    return textwrap.dedent(re.search(r"```python\n(.*?)```", body, re.DOTALL).group(1))
