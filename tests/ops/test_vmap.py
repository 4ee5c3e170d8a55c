"""torch.vmap runs each crelu op once on the whole batch, never through vmap's
per-sample fallback, and gives the per-sample results bit for bit (masks
included): per-sample gradients (vmap(grad)), nested vmap, in_dims, and vmap
inside jacrev, jacfwd and hessian, with special values (NaN, +-0, +-inf,
subnormals)."""

import collections
import contextlib
import warnings

import pytest
import torch
from helpers import DEVICES, assert_bitwise_equal, backend_devices_and_dtypes, make_input
from torch.func import grad, hessian, jacfwd, jacrev, vjp, vmap
from torch.utils._pytree import tree_flatten

import crelu_ext

# torch's message when an op without a batching rule runs once per sample.
FALLBACK = "There is a performance drop"
BATCH = 64
DTYPES = [torch.float64, torch.float32]


@contextlib.contextmanager
def batched_calls_only(capfd):
    """Fails if an op ran through vmap's fallback. torch warns of it through
    Python's warnings where the autograd engine called the op, and on its C++
    log (stderr) where Python called it."""
    capfd.readouterr()
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=FALLBACK, category=UserWarning)
        yield
    err = capfd.readouterr().err
    assert FALLBACK not in err, err


def op_calls(fn):
    """How many times each crelu_ext op was called while fn ran."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        fn()
    return collections.Counter(
        event.name for event in profile.events() if event.name.startswith("crelu_ext::")
    )


def assert_all_bitwise_equal(actual, expected, what):
    actual, _ = tree_flatten(actual)
    expected, _ = tree_flatten(expected)
    assert len(actual) == len(expected)
    for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
        if a.is_floating_point():
            assert_bitwise_equal(a, e, f"{what}, output {i}")
        else:  # a mask
            assert a.shape == e.shape and torch.equal(a, e), f"{what}, output {i}"


def per_sample(f, *batches, in_dims):
    """f sample by sample, each output stacked: what vmap(f) must give."""
    size = next(b.shape[d] for b, d in zip(batches, in_dims, strict=True) if d is not None)
    results = []
    for i in range(size):
        args = (b if d is None else b.select(d, i) for b, d in zip(batches, in_dims, strict=True))
        results.append(f(*args))
    flat = [tree_flatten(r)[0] for r in results]
    return [torch.stack(outputs) for outputs in zip(*flat, strict=True)]


def weighted(f, w):
    """A scalar function of x whose derivatives of every order go through f's."""
    return lambda x: (f(x).square() * w).sum()


def require_native(device):
    # A machine whose build lacks the native kernels for this device.
    if not crelu_ext._native.native_available(torch.device(device)):
        pytest.skip(f"no native kernels for {device}")


def sample_layouts():
    """(name, batch shape with the batch dim first, in_dim, dim): samples
    contiguous, channels_last, not dense; sizes with and without a whole number
    of mask blocks."""
    yield "contiguous", (5, 2, 3, 4, 2), 0, 1
    yield "256", (7, 256), 0, -1
    yield "channels_last", (5, 2, 3, 4, 4), "channels_last", 1
    yield "in_dim2", (3, 4, 5, 3), 2, 0
    yield "in_dim-1", (4, 3, 5, 6), -1, -1


def batch_of(shape, in_dim, dtype, device, seed):
    x = make_input(shape, dtype, device, seed=seed, special_fraction=0.4)
    if in_dim == "channels_last":  # shape read as [B, N, H, W, C]: [N, C, H, W] samples
        x = x.permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3)
        assert x[0].is_contiguous(memory_format=torch.channels_last)
        return x, 0
    return x.movedim(0, in_dim), in_dim


# Per-sample inputs: (batch shape, in_dim or "channels_last" for
# batch_of, the per-sample function's view of a sample, dim). The NCHW samples
# have 105 elements, not a whole number of 32-element mask blocks; the others do.
PER_SAMPLE_CASES = {
    "NCHW-dim1": ((BATCH, 3, 5, 7), 0, lambda x: x.unsqueeze(0), 1),
    "B256-dim-1": ((BATCH, 256), 0, lambda x: x, -1),
    "channels_last-dim1": ((BATCH, 2, 4, 4, 2), "channels_last", lambda x: x, 1),
}


def per_sample_loss(case, dtype, device):
    """(the batch, loss, dim) of a PER_SAMPLE_CASES case: ``loss(crelu)`` is a
    scalar function of one sample through ``crelu(view(sample), dim)``."""
    shape, in_dim, view, dim = PER_SAMPLE_CASES[case]
    x, _ = batch_of(shape, in_dim, dtype, device, seed=0)
    out_shape = list(view(x[0]).shape)
    out_shape[dim] *= 2
    w = make_input(out_shape, dtype, device, seed=1, special_fraction=0.2)

    def loss(crelu):
        return weighted(lambda sample: crelu(view(sample), dim), w)

    return x, loss, dim


@pytest.mark.parametrize("case", PER_SAMPLE_CASES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("device", DEVICES)
def test_per_sample_gradients(case, dtype, device, capfd):
    require_native(device)
    x, loss, _dim = per_sample_loss(case, dtype, device)
    fused = loss(lambda t, d: crelu_ext.crelu(t, d, backend="native"))
    reference = loss(crelu_ext.reference.crelu)
    with batched_calls_only(capfd):
        actual = vmap(grad(fused))(x)
    calls = op_calls(lambda: vmap(grad(fused))(x))
    # The call vmap takes and the batched call, not one per sample.
    assert set(calls) == {"crelu_ext::crelu", "crelu_ext::crelu_backward"}, calls
    assert max(calls.values()) < BATCH, calls
    assert_all_bitwise_equal(actual, per_sample(grad(fused), x, in_dims=(0,)), "loop of grad")
    assert_all_bitwise_equal(actual, per_sample(grad(reference), x, in_dims=(0,)), "reference")


@pytest.mark.parametrize("layout", [layout[0] for layout in sample_layouts()])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("device", DEVICES)
def test_ops_match_per_sample_calls(layout, dtype, device, capfd):
    # Each op on batched inputs, its mask batched or shared by every sample.
    require_native(device)
    _, shape, in_dim, dim = next(c for c in sample_layouts() if c[0] == layout)
    ops = torch.ops.crelu_ext
    x, in_dim = batch_of(shape, in_dim, dtype, device, seed=0)
    for save_mask in (True, False):

        def forward(t, save_mask=save_mask):
            return ops.crelu(t, dim, save_mask)

        with batched_calls_only(capfd):
            actual = vmap(forward, in_dims=in_dim)(x)
        assert_all_bitwise_equal(actual, per_sample(forward, x, in_dims=(in_dim,)), "crelu")

    samples = x.movedim(in_dim, 0)
    out, mask = per_sample(lambda t: ops.crelu(t, dim, True), samples, in_dims=(0,))
    grad_out = make_input(out.shape, dtype, device, seed=1, special_fraction=0.4)
    memory_format = crelu_ext._layout.output_memory_format(samples[0])
    for op, source in ((ops.crelu_backward, grad_out), (ops.crelu_backward_backward, samples)):

        def masked(g, m, op=op):
            return op(g, m, dim, memory_format)

        for in_dims in ((0, 0), (0, None), (None, 0)):
            args = [t if d == 0 else t[0] for t, d in zip((source, mask), in_dims, strict=True)]
            with batched_calls_only(capfd):
                actual = vmap(masked, in_dims=in_dims)(*args)
            expected = per_sample(masked, *args, in_dims=in_dims)
            assert_all_bitwise_equal(actual, expected, f"{op} with in_dims {in_dims}")


SHAPE = (2, 4, 3)
# Every backend that runs here, less the reference: it has no ops to batch.
OP_BACKENDS = pytest.mark.parametrize(
    ("backend_device", "dtype"),
    backend_devices_and_dtypes(DTYPES, include=lambda backend, _: backend != "reference"),
)


@pytest.fixture
def case(backend_device, dtype):
    backend, device = backend_device

    def make(shape, seed):
        return make_input(shape, dtype, device, seed=seed, special_fraction=0.4)

    return backend, make


def check_modes_agree(mode, backend, capfd, dim=1):
    """``mode(f)`` with f the backend's crelu, run without the fallback, and
    with the composition."""
    with batched_calls_only(capfd):
        actual = mode(lambda x: crelu_ext.crelu(x, dim, backend=backend))
    expected = mode(lambda x: crelu_ext.reference.crelu(x, dim))
    assert_all_bitwise_equal(actual, expected, backend)


@OP_BACKENDS
def test_vmap_in_dims_and_nesting(case, capfd):
    backend, make = case
    batch, nested = make((5, *SHAPE), 0), make((3, 4, *SHAPE), 1)
    w = make((2, 8, 3), 2)
    check_modes_agree(lambda f: vmap(f, in_dims=2)(batch.movedim(0, 2)), backend, capfd)
    check_modes_agree(lambda f: vmap(f, in_dims=-1)(batch.movedim(0, -1)), backend, capfd, dim=-1)
    check_modes_agree(lambda f: vmap(vmap(f))(nested), backend, capfd)
    check_modes_agree(lambda f: vmap(vmap(grad(weighted(f, w))))(nested), backend, capfd)
    # The inner batch dim after the outer one is taken out, at other places.
    moved = nested.permute(2, 0, 3, 1, 4)
    check_modes_agree(
        lambda f: vmap(vmap(grad(weighted(f, w)), in_dims=2), in_dims=1)(moved), backend, capfd
    )
    check_modes_agree(
        lambda f: vmap(grad(lambda xs: vmap(weighted(f, w))(xs).sum()))(nested), backend, capfd
    )


@OP_BACKENDS
@pytest.mark.parametrize("samples", PER_SAMPLE_CASES)
def test_per_sample_gradients_of_every_backend(backend_device, dtype, samples, capfd):
    backend, device = backend_device
    x, loss, dim = per_sample_loss(samples, dtype, device)

    def per_sample_gradients(f):
        # check_modes_agree's f has its dim bound already.
        return vmap(grad(loss(lambda t, _dim: f(t))))(x)

    check_modes_agree(per_sample_gradients, backend, capfd, dim)


@OP_BACKENDS
def test_vmap_over_jacobians(case, capfd):
    backend, make = case
    x, batch, w = make(SHAPE, 0), make((3, *SHAPE), 1), make((2, 8, 3), 2)
    cotangents = make((4, 2, 8, 3), 3)
    # One sample's mask, shared by a batch of cotangents.
    check_modes_agree(lambda f: vmap(vjp(f, x)[1])(cotangents), backend, capfd)
    check_modes_agree(lambda f: jacrev(f)(x), backend, capfd)
    check_modes_agree(lambda f: jacfwd(f)(x), backend, capfd)
    check_modes_agree(lambda f: hessian(weighted(f, w))(x), backend, capfd)
    check_modes_agree(lambda f: jacfwd(jacfwd(weighted(f, w)))(x), backend, capfd)
    check_modes_agree(lambda f: jacrev(jacfwd(weighted(f, w)))(x), backend, capfd)
    check_modes_agree(lambda f: vmap(jacrev(f))(batch), backend, capfd)
    check_modes_agree(lambda f: vmap(jacfwd(f))(batch), backend, capfd)
    check_modes_agree(lambda f: vmap(hessian(weighted(f, w)))(batch), backend, capfd)


def test_rejected_calls_raise_the_ops_error(capfd):
    # Checked per sample, so the message speaks of one sample, not of the batch.
    require_native("cpu")
    ops = torch.ops.crelu_ext
    x = torch.randn(4, 2, 3)
    with (
        batched_calls_only(capfd),
        pytest.raises(IndexError, match="dim 3 is out of range for a 2-D"),
    ):
        vmap(lambda t: crelu_ext.crelu(t, 3, backend="native"))(x)
    with (
        batched_calls_only(capfd),
        pytest.raises(IndexError, match="dim 3 is out of range for a 2-D"),
    ):
        vmap(lambda t: crelu_ext.crelu(t, 3, backend="native"))(x[:0])
    out, mask = ops.crelu(x[0], 1, True)
    grads = torch.randn(4, *out.shape)
    with batched_calls_only(capfd), pytest.raises(RuntimeError, match="mask of 8 bytes"):
        vmap(lambda g: ops.crelu_backward(g, mask[:4], 1, torch.contiguous_format))(grads)
    with batched_calls_only(capfd), pytest.raises(RuntimeError, match="even size at dim 1"):
        vmap(lambda g: ops.crelu_backward(g[..., 1:], mask, -1, torch.contiguous_format))(grads)
