"""Every CUDA and Triton kernel once on each path, checked against the
reference: the workload gpu_check.sh runs under compute-sanitizer.

Paths: vectorized (rows of multiples of 8, aligned), scalar (odd rows), a
misaligned input (storage offset 1), tails, channels_last, and all three
kernels (forward with and without mask, backward, double backward).
"""

import argparse

import torch

import crelu_ext

CASES = [
    ((4, 64, 8, 8), torch.float32, "contiguous"),
    ((3, 37, 5), torch.float16, "contiguous"),
    ((2, 24, 7, 9), torch.bfloat16, "channels_last"),
    ((1001,), torch.float64, "offset"),
]


def make(shape, dtype, layout, device):
    x = torch.randn(shape, dtype=torch.float64, device=device)
    x[..., ::7] = float("nan")
    x = x.to(dtype)
    if layout == "channels_last":
        return x.to(memory_format=torch.channels_last)
    if layout == "offset":
        flat = torch.empty(x.numel() + 1, dtype=dtype, device=device)
        flat[1:] = x.reshape(-1)
        return flat[1:].view(shape)
    return x


def derivatives(x, backend):
    x = x.detach().clone().requires_grad_(True)
    out = (
        crelu_ext.reference.crelu(x, 1 if x.dim() > 1 else 0)
        if backend == "reference"
        else crelu_ext.crelu(x, 1 if x.dim() > 1 else 0, backend=backend)
    )
    g = torch.ones_like(out).requires_grad_(True)
    (grad_x,) = torch.autograd.grad(out, x, g, create_graph=True)
    (grad_g,) = torch.autograd.grad(grad_x, g, torch.ones_like(grad_x))
    with torch.no_grad():
        inference = crelu_ext.crelu(x, 1 if x.dim() > 1 else 0, backend=backend)
    return out, grad_x, grad_g, inference


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cuda")
    device = parser.parse_args().device
    failures = 0
    backends = [b for b in crelu_ext.available_backends(device) if b != "reference"]
    for backend in backends:
        for shape, dtype, layout in CASES:
            x = make(shape, dtype, layout, device)
            expected = derivatives(x, "reference")
            actual = derivatives(x, backend)
            expected = (*expected[:3], expected[0])
            for a, e in zip(actual, expected, strict=True):
                same = torch.equal(a.isnan(), e.isnan()) and torch.equal(
                    a.nan_to_num(0), e.nan_to_num(0)
                )
                if not same:
                    failures += 1
                    print(f"MISMATCH {backend} {shape} {dtype} {layout}")
    if device == "cuda":
        torch.cuda.synchronize()
    print(f"sanitizer cases: {len(backends)} backends x {len(CASES)} cases, {failures} mismatches")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
