"""The TorchScript ONNX exporter exports direct calls of the ops, registered
without importing torch.onnx at ``import crelu_ext``; the front asks torch.onnx
whether it is exporting only under torch.export or torch.jit's tracer."""

import subprocess
import sys
import textwrap

import pytest
import torch

import crelu_ext
from crelu_ext import _export

pytest.importorskip("onnx")

DIRECT_CALL_EXPORT = """
import sys
sys.modules["triton"] = None  # Triton's import would load torch.onnx itself
import torch, crelu_ext
assert "torch.onnx" not in sys.modules, "import crelu_ext imported torch.onnx"
import warnings, onnx

class DirectCall(torch.nn.Module):
    def forward(self, x):
        return torch.ops.crelu_ext.crelu(x, 1, False)[0]

warnings.simplefilter("ignore")
torch.onnx.export(DirectCall(), (torch.randn(2, 3),), {path!r}, dynamo=False)
print(sorted({{node.op_type for node in onnx.load({path!r}).graph.node}}))
"""


def test_torchscript_exporter_exports_a_direct_call_of_the_op(tmp_path):
    if "native" not in crelu_ext.available_backends("cpu"):
        pytest.skip("native backend not built")
    code = DIRECT_CALL_EXPORT.format(path=str(tmp_path / "direct.onnx"))
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "['Concat', 'Neg', 'Relu']"


def test_the_front_asks_torch_onnx_only_while_tracing_or_exporting(monkeypatch):
    asked = []

    def exporting():
        asked.append(True)
        return False

    monkeypatch.setattr(_export, "exporting", exporting)
    x = torch.randn(2, 3)
    crelu_ext.crelu(x)
    assert asked == []
    torch.jit.trace(lambda t: crelu_ext.crelu(t), (x,), check_trace=False)
    assert asked == [True]
    torch.export.export(crelu_ext.CReLU(), (x,))
    assert len(asked) >= 2
