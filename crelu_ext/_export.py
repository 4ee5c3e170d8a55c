"""ONNX export of the crelu ops as standard ONNX ops (Relu, Neg, Concat), with
no registration by the user, for both of ``torch.onnx.export``'s exporters.

- While either exporter traces a model (``torch.onnx.is_in_onnx_export()``),
  ``crelu_ext.crelu`` and ``CReLU`` run the composition they are defined as
  (:func:`exporting`, checked by the front in functional.py), which both
  exporters translate to standard ops. The op itself is left alone: a
  decomposition in ``torch._decomp.decomposition_table`` would also reach
  torch.compile (Inductor refuses an op that has one when ``$CI`` is set) and
  FakeTensor.
- ``dynamo=False`` (TorchScript) also exports direct calls of the ops (and
  scripted modules, which never run the front), through symbolic functions
  registered with ``torch.onnx.register_custom_op_symbolic``. torch imports
  ``torch.onnx`` lazily, so they are registered when ``torch.onnx`` is
  imported (or at once, when it already is), by an import hook: Python has no
  post-import hook of its own, and importing torch.onnx here costs ~30 ms,
  more than ``import crelu_ext`` takes without it (~20 ms, measured).

ONNX Runtime's Relu and Neg keep NaN and the sign of zero as torch does, so
its output equals torch's bitwise (tests/ops/test_export.py checks this).
"""

import importlib.abc
import importlib.util
import sys

import torch

# The forward ops ``(x, dim, save_mask) -> (out, mask)`` of the backends that
# have compiled or Triton kernels; the reference backend is the composition.
FORWARD_OPS = ("crelu", "triton_crelu")
ONNX_OPSET = 11  # from which on Concat takes a negative axis


def exporting() -> bool:
    """Whether torch.onnx.export is tracing a model (torch.onnx is loaded by
    then). ``torch.onnx.is_in_onnx_export`` costs ~2 us (it imports two modules
    on each call), so the front asks only under torch.export or torch.jit's
    tracer, which both exporters run the model under."""
    if torch.compiler.is_dynamo_compiling():
        return False  # torch.compile and strict torch.export keep the op
    onnx = sys.modules.get("torch.onnx")
    return onnx is not None and onnx.is_in_onnx_export()


def _register_torchscript_symbolics(onnx_module) -> None:
    from torch.onnx.symbolic_helper import parse_args

    @parse_args("v", "i", "none")
    def crelu_symbolic(g, x, dim, save_mask):
        # The mask output gets None: the exporter accepts that while nothing in
        # the graph uses the mask, and otherwise fails naming the op.
        return g.op("Concat", g.op("Relu", x), g.op("Relu", g.op("Neg", x)), axis_i=dim), None

    for name in FORWARD_OPS:
        onnx_module.register_custom_op_symbolic(f"crelu_ext::{name}", crelu_symbolic, ONNX_OPSET)


class _WhenTorchOnnxImported(importlib.abc.MetaPathFinder):
    """Finds nothing itself: it wraps torch.onnx's loader so that the symbolic
    functions are registered right after torch.onnx has run, then leaves."""

    def find_spec(self, fullname, path, target=None):
        if fullname != "torch.onnx":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return None
        load = spec.loader.exec_module

        def exec_module(module):
            load(module)
            _register_torchscript_symbolics(module)

        spec.loader.exec_module = exec_module
        return spec


def register() -> None:
    """Makes the TorchScript exporter export the crelu ops; called once, at import."""
    if "torch.onnx" in sys.modules:
        _register_torchscript_symbolics(sys.modules["torch.onnx"])
    else:
        sys.meta_path.insert(0, _WhenTorchOnnxImported())


register()
