"""Deployment: ONNX export with both exporters (no user registration),
torch.export and AOTInductor, each compared with eager.

While torch.onnx.export traces, crelu_ext.crelu runs the composition whatever
its backend (crelu_ext/_export.py), so the ONNX tests run once per exporter;
torch.export and AOTInductor keep each backend's op, so they run per backend."""

import subprocess
import sys
import zipfile

import pytest
import torch
from helpers import (
    FORWARD_OPS,
    assert_bitwise_equal,
    backend_devices,
    make_input,
    readme_example,
)

import crelu_ext
from crelu_ext import _export

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

EXPORTERS = ["dynamo", "torchscript"]
STANDARD_OPS = {"Relu", "Neg", "Concat"}


def _onnx_export(model, x, path, exporter):
    """Exports with a dynamic batch dimension, the way a user would."""
    if exporter == "dynamo":
        batch = torch.export.Dim("batch", min=1)
        torch.onnx.export(model, (x,), path, dynamic_shapes=({0: batch},), verbose=False)
    else:
        torch.onnx.export(
            model, (x,), path, dynamo=False, input_names=["x"], dynamic_axes={"x": {0: "batch"}}
        )
    return onnx.load(path)


def _run_ort(path, x: torch.Tensor) -> torch.Tensor:
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    return torch.from_numpy(out)


def _op_types(model) -> set[tuple[str, str]]:
    return {(node.domain, node.op_type) for node in model.graph.node}


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
@pytest.mark.parametrize(("shape", "dim"), [((2, 3, 4, 5), 1), ((2, 3, 4, 5), -1), ((3, 7), 1)])
def test_onnx_activation_is_standard_ops_and_bitwise_equal(tmp_path, exporter, dtype, shape, dim):
    model = crelu_ext.CReLU(dim).eval()
    path = str(tmp_path / "crelu.onnx")
    exported = _onnx_export(model, make_input(shape, dtype, seed=1), path, exporter)
    assert _op_types(exported) == {("", op) for op in STANDARD_OPS}
    # Another batch size than the exported one, with NaN, +-0, +-inf, subnormals.
    x = make_input((5, *shape[1:]), dtype, seed=2)
    assert_bitwise_equal(_run_ort(path, x), crelu_ext.crelu(x, dim), f"{exporter} {dtype}")


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_onnx_export_does_not_depend_on_the_backend(tmp_path, exporter):
    """A model built for Triton exports the standard ops too, even where Triton
    cannot run: the backend is not looked up while the exporter traces."""
    model = crelu_ext.CReLU(-1, backend="triton").eval()
    path = str(tmp_path / "crelu.onnx")
    exported = _onnx_export(model, torch.randn(2, 3, 4), path, exporter)
    assert _op_types(exported) == {("", op) for op in STANDARD_OPS}
    x = make_input((3, 3, 4), torch.float32, seed=7)
    assert_bitwise_equal(_run_ort(path, x), crelu_ext.reference.crelu(x, -1))


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_onnx_network_matches_eager(tmp_path, exporter):
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), crelu_ext.CReLU(), torch.nn.Conv2d(8, 2, 1)
    ).eval()
    path = str(tmp_path / "net.onnx")
    exported = _onnx_export(model, torch.randn(2, 3, 8, 8), path, exporter)
    assert {op for _, op in _op_types(exported)} == STANDARD_OPS | {"Conv"}
    x = torch.randn(6, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(_run_ort(path, x), model(x))


def test_onnx_export_leaves_the_op_untouched_outside_export():
    """The composition is used only while torch.onnx.export traces: torch.export
    and torch.compile keep the fused op, and the op has no decomposition that
    Inductor would refuse it for (it does when $CI is set)."""
    assert not _export.exporting()
    assert torch.ops.crelu_ext.crelu.default not in torch._decomp.decomposition_table
    program = torch.export.export(crelu_ext.CReLU(-1), (torch.randn(2, 6),))
    assert any(node.target is torch.ops.crelu_ext.crelu.default for node in program.graph.nodes)


def test_torchscript_export_refuses_a_graph_that_uses_the_mask(tmp_path):
    class ReturnsMask(torch.nn.Module):
        def forward(self, x):
            return torch.ops.crelu_ext.crelu(x, 1, True)

    with pytest.raises(Exception, match="crelu"):
        path = str(tmp_path / "m.onnx")
        torch.onnx.export(ReturnsMask(), (torch.randn(2, 3),), path, dynamo=False)


def test_import_does_not_import_onnx_and_registers_when_torch_onnx_loads(tmp_path):
    """Without Triton nothing imports torch.onnx at `import crelu_ext`; the
    TorchScript symbolic is then registered when torch.onnx is imported."""
    code = f"""
import sys
sys.modules["triton"] = None  # as on a machine without Triton
import torch, crelu_ext
assert "onnx" not in sys.modules and "torch.onnx" not in sys.modules, "imported onnx"
import warnings; warnings.simplefilter("ignore")
path = {str(tmp_path / "m.onnx")!r}
torch.onnx.export(crelu_ext.CReLU(), (torch.randn(2, 3),), path, dynamo=False)
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]


def _crelu_ext_ops(program) -> set[str]:
    """The crelu_ext ops the exported graph calls (``crelu_ext.name.overload``)."""
    targets = (str(node.target) for node in program.graph.nodes if node.op == "call_function")
    return {target for target in targets if target.startswith("crelu_ext.")}


@pytest.mark.parametrize("backend_device", backend_devices())
def test_torch_export_dynamic_batch_keeps_the_backends_op(backend_device):
    backend, device = backend_device
    model = crelu_ext.CReLU(1, backend=backend)
    batch = torch.export.Dim("batch", min=1)
    x = torch.randn(2, 3, 4, device=device)
    program = torch.export.export(model, (x,), dynamic_shapes=({0: batch},))
    expected = {f"crelu_ext.{FORWARD_OPS[backend]}.default"} if backend in FORWARD_OPS else set()
    assert _crelu_ext_ops(program) == expected
    x = make_input((5, 3, 4), torch.float32, device, seed=5)
    assert_bitwise_equal(program.module()(x), crelu_ext.reference.crelu(x, 1))


# The backends that ship kernels, where AOTInductor can compile them: the
# emulated ops would take the native op's path (an extern call) again.
@pytest.mark.parametrize(
    "backend_device",
    backend_devices(include=lambda b, d: b == "native" or (b, d) == ("triton", "cuda")),
)
def test_aoti_package_runs_the_backends_kernels(tmp_path, backend_device):
    """One small model through AOTInductor: compile, package, load, run. The
    native op is not lowered into Inductor's code: the package's C++ hands it
    to the proxy executor, which calls crelu_ext::crelu through the dispatcher
    (seen in the profiler). The Triton op's kernels are compiled into the
    package."""
    backend, device = backend_device
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 4), crelu_ext.CReLU(-1, backend=backend))
    model = model.to(device).eval()
    batch = torch.export.Dim("batch", min=1)
    example = (torch.randn(2, 8, device=device),)
    program = torch.export.export(model, example, dynamic_shapes=({0: batch},))
    package = torch._inductor.aoti_compile_and_package(
        program, package_path=str(tmp_path / "crelu.pt2")
    )
    with zipfile.ZipFile(package) as archive:
        sources = b"\n".join(
            archive.read(name) for name in archive.namelist() if name.endswith((".cpp", ".json"))
        )
    if backend == "native":
        assert b"aoti_torch_proxy_executor_call_function" in sources
        assert b'"target": "crelu_ext::crelu"' in sources
    else:
        assert b"_crelu_forward_kernel" in sources
        assert b"aoti_torch_proxy_executor_call_function" not in sources

    loaded = torch._inductor.aoti_load_package(package)
    x = make_input((5, 8), torch.float32, device, seed=6)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        out = loaded(x)
    assert ("crelu_ext::crelu" in {event.name for event in profile.events()}) == (
        backend == "native"
    )
    with torch.no_grad():
        assert_bitwise_equal(out, model(x))


def test_readme_onnx_example_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exec(readme_example("Deploying"), {})  # it checks onnxruntime's results itself
    assert not list(tmp_path.iterdir()), "the example writes its files to a temporary folder"
