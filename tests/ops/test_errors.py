"""Bad input: clear Python exceptions that name the op, on every backend."""

import pytest
import torch

import crelu_ext


@pytest.mark.parametrize(
    "dtype", [torch.int32, torch.int64, torch.uint8, torch.bool, torch.complex64], ids=str
)
def test_non_float_dtypes_raise_type_error(backend_device, dtype):
    backend, device = backend_device
    x = torch.ones(2, 3, device=device).to(dtype)
    with pytest.raises(TypeError, match=r"crelu_ext\.crelu: .*float16, bfloat16.*" + str(dtype)):
        crelu_ext.crelu(x, 1, backend=backend)


def test_zero_dim_tensor_raises(backend_device):
    backend, device = backend_device
    with pytest.raises(RuntimeError, match=r"crelu_ext\.crelu: a zero-dimensional tensor"):
        crelu_ext.crelu(torch.tensor(1.0, device=device), 0, backend=backend)


def _unsupported_layouts(device: str) -> list:
    layouts = [
        ("sparse_coo", lambda x: x.to_sparse()),
        ("sparse_csr", lambda x: x.to_sparse_csr()),
        ("sparse_csc", lambda x: x.to_sparse_csc()),
    ]
    if device == "cpu" and torch.backends.mkldnn.is_available():
        layouts.append(("_mkldnn", lambda x: x.to_mkldnn()))
    return layouts


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta state:UserWarning")
@pytest.mark.parametrize("call", ["functional", "module"])
def test_layouts_other_than_strided_raise_one_clear_error(backend_device, call):
    backend, device = backend_device
    for name, convert in _unsupported_layouts(device):
        x = convert(torch.randn(3, 4, device=device))
        with pytest.raises(TypeError) as error:
            if call == "module":
                crelu_ext.CReLU(backend=backend)(x)
            else:
                crelu_ext.crelu(x, 1, backend=backend)
        assert str(error.value) == (
            f"crelu_ext.crelu: expected a dense (strided) tensor, got layout torch.{name}; "
            "convert it with .to_dense()"
        )
        # Alone: not shown after the dispatcher's long error for the layout.
        assert error.value.__cause__ is None
        assert error.value.__context__ is None or error.value.__suppress_context__


@pytest.mark.parametrize("dim", [2, -3, 100])
def test_dim_out_of_range_raises_index_error(backend_device, dim):
    backend, device = backend_device
    with pytest.raises(IndexError, match=rf"crelu_ext\.crelu: dim {dim} is out of range"):
        crelu_ext.crelu(torch.ones(2, 3, device=device), dim, backend=backend)


@pytest.mark.parametrize("call", ["module", "functional"])
def test_the_default_dim_is_named_when_out_of_range(backend_device, call):
    backend, device = backend_device

    def run(x, *dim):
        if call == "module":
            return crelu_ext.CReLU(*dim, backend=backend)(x)
        return crelu_ext.crelu(x, *dim, backend=backend)

    with pytest.raises(
        IndexError, match=r"crelu_ext\.crelu: dim 1 is out of range.*1 is the default dim"
    ):
        run(torch.randn(3, device=device))
    with pytest.raises(IndexError, match=r"dim 2 is out of range") as error:
        run(torch.randn(3, device=device), 2)
    assert "default" not in str(error.value)


def test_non_tensor_and_non_int_dim_raise_type_error(backend_device):
    backend, device = backend_device
    with pytest.raises(TypeError, match=r"crelu_ext\.crelu: expected a torch\.Tensor, got list"):
        crelu_ext.crelu([1.0, -1.0], 0, backend=backend)
    with pytest.raises(TypeError, match=r"crelu_ext\.crelu: dim must be an int, got float"):
        crelu_ext.crelu(torch.ones(2, 3, device=device), 1.0, backend=backend)


def test_the_native_op_checks_its_own_inputs():
    if "native" not in crelu_ext.available_backends("cpu"):
        pytest.skip("native backend not built")
    ops = torch.ops.crelu_ext
    with pytest.raises(TypeError, match=r"crelu_ext\.crelu: expected x to be float16"):
        ops.crelu(torch.ones(3, dtype=torch.int32), 0, False)
    with pytest.raises(IndexError, match=r"crelu_ext\.crelu: dim 1 is out of range"):
        ops.crelu(torch.ones(3), 1, False)
    with pytest.raises(RuntimeError, match=r"crelu_ext\.crelu: a zero-dimensional"):
        ops.crelu(torch.tensor(1.0), 0, False)
    _, mask = ops.crelu(torch.ones(4, 64), 1, True)
    with pytest.raises(RuntimeError, match=r"crelu_ext\.crelu_backward: expected the uint8 mask"):
        ops.crelu_backward(torch.ones(4, 64), mask, 1, torch.contiguous_format)
    with pytest.raises(
        RuntimeError, match=r"crelu_ext\.crelu_backward: grad_out must have an even"
    ):
        ops.crelu_backward(torch.ones(4, 127), mask, 1, torch.contiguous_format)
    with pytest.raises(RuntimeError, match=r"crelu_ext\.crelu_backward: memory_format"):
        ops.crelu_backward(torch.ones(4, 128), mask, 1, torch.channels_last)
    misaligned = torch.empty(mask.numel() + 1, dtype=torch.uint8)[1:]
    with pytest.raises(RuntimeError, match=r"crelu_ext\.crelu_backward: the mask must start on"):
        ops.crelu_backward(torch.ones(4, 128), misaligned, 1, torch.contiguous_format)
    with pytest.raises(RuntimeError, match=r"crelu_ext\.crelu_backward_backward: expected the"):
        ops.crelu_backward_backward(torch.ones(4, 65), mask, 1, torch.contiguous_format)


def test_unknown_backend_lists_the_available_ones():
    with pytest.raises(
        ValueError, match=r"unknown backend 'cuda'.*available on cpu: \[.*'reference'\]"
    ):
        crelu_ext.crelu(torch.ones(2, 2), 1, backend="cuda")


def test_an_unknown_backend_fails_the_module_at_construction():
    with pytest.raises(ValueError) as functional:
        crelu_ext.crelu(torch.ones(2, 2), 1, backend="nope")
    with pytest.raises(ValueError) as module:
        crelu_ext.CReLU(backend="nope")
    assert str(module.value) == str(functional.value)
    assert "unknown backend 'nope'" in str(module.value)
    for name in ["auto", *crelu_ext.available_backends("cpu"), "triton"]:
        assert crelu_ext.CReLU(backend=name).backend == name  # known names, available or not


def test_unavailable_backend_lists_the_available_ones():
    assert "triton" not in crelu_ext.available_backends("cpu")
    with pytest.raises(
        RuntimeError, match=r"backend 'triton' is not available for cpu.*'reference'"
    ):
        crelu_ext.crelu(torch.ones(2, 2), 1, backend="triton")


def grad_fn_name(out: torch.Tensor) -> str:
    # The node's type name: torch < 2.14 refuses grad_fn.name() on custom ops' nodes.
    return type(out.grad_fn).__name__


def test_set_default_backend_changes_what_auto_means():
    x = torch.randn(2, 3, requires_grad=True)
    assert crelu_ext.set_default_backend("reference") == "auto"
    try:
        assert grad_fn_name(crelu_ext.crelu(x, 1)) == "CatBackward0"
        # An explicit backend wins over the default.
        if "native" in crelu_ext.available_backends("cpu"):
            assert grad_fn_name(crelu_ext.crelu(x, 1, backend="native")) != "CatBackward0"
        with pytest.raises(ValueError, match=r"unknown backend 'fast'; choose 'auto' or one of"):
            crelu_ext.set_default_backend("fast")
    finally:
        assert crelu_ext.set_default_backend("auto") == "reference"
    uses_reference = grad_fn_name(crelu_ext.crelu(x, 1)) == "CatBackward0"
    assert uses_reference == (crelu_ext.available_backends()[0] == "reference")


def test_a_default_backend_unavailable_for_the_device_names_it():
    crelu_ext.set_default_backend("triton")
    try:
        with pytest.raises(RuntimeError, match=r"backend 'triton' is not available for cpu"):
            crelu_ext.crelu(torch.ones(2, 2), 1)
    finally:
        crelu_ext.set_default_backend("auto")


def test_auto_prefers_native():
    backends = crelu_ext.available_backends("cpu")
    assert backends[-1] == "reference"
    x = torch.randn(2, 3, requires_grad=True)
    uses_reference = grad_fn_name(crelu_ext.crelu(x, 1)) == "CatBackward0"
    assert uses_reference == (backends[0] == "reference")
