"""ONNX export of the crelu ops as standard ONNX ops (Relu, Neg, Concat), with
no registration by the user, for both of ``torch.onnx.export``'s exporters.

- ``dynamo=True`` (the default) runs ``torch.export`` and then decomposes every
  op that has no ONNX translation but an entry in
  ``torch._decomp.decomposition_table``. crelu's entry is the composition it
  is defined as (plus the exact packed mask when one was asked for, which an
  inference graph never uses and the exporter drops). FakeTensor also prefers
  that entry to the op's fake kernel under symbolic shapes (torch.compile and
  torch.export with dynamic sizes), so it must give the kernels' output layout
  and mask size and add no guards on the sizes.
- ``dynamo=False`` (TorchScript) looks ops up in its registry of symbolic
  functions. torch imports ``torch.onnx`` lazily, and importing it here would
  slow down ``import crelu_ext``, so the symbolic functions are registered
  when ``torch.onnx`` is imported (or at once, when it already is).

ONNX Runtime's Relu and Neg keep NaN and the sign of zero as torch does, so
its output equals torch's bitwise (tests/test_export.py checks this).
"""

import importlib.abc
import importlib.util
import sys

import torch

from . import ops, triton_kernels  # noqa: F401  (they define the ops registered here)
from ._layout import MASK_BLOCK, memory_order, output_memory_format

# The forward ops ``(x, dim, save_mask) -> (out, mask)`` of the backends that
# have compiled or Triton kernels (and the host-emulated CUDA kernels, which
# tests export like any backend); the reference backend is the composition.
FORWARD_OPS = ("crelu", "triton_crelu", "emulated_crelu", "emulated64_crelu")
ONNX_OPSET = 11  # from which on Concat takes a negative axis


def _packed_mask(x: torch.Tensor) -> torch.Tensor:
    """The mask the kernels save (csrc/crelu.h), from torch ops: in x's memory
    order, per block of 32 elements a little-endian uint32 of "x > 0 or NaN"
    bits, then one of "x < 0 or NaN" bits; padding bits are 0. Written without
    padding or reshaping into blocks, which would make torch.export specialize
    a dynamic size."""
    flat = x.permute(memory_order(x.dim(), output_memory_format(x))).reshape(-1)
    index = torch.arange(flat.numel(), device=x.device)
    bits = torch.ones_like(index) << (index % MASK_BLOCK)
    pos_word = index // MASK_BLOCK * 2
    blocks = (flat.numel() + MASK_BLOCK - 1) // MASK_BLOCK
    words = torch.zeros(2 * blocks, dtype=torch.int64, device=x.device)
    words = words.index_add(0, pos_word, bits * ~(flat <= 0))
    words = words.index_add(0, pos_word + 1, bits * ~(flat >= 0))
    byte_shifts = torch.arange(0, 32, 8, device=x.device)
    return ((words.unsqueeze(-1) >> byte_shifts) & 0xFF).to(torch.uint8).reshape(-1)


def _crelu_composition(x: torch.Tensor, dim: int, save_mask: bool):
    # FakeTensor prefers this to the op's fake kernel under symbolic shapes, so
    # it lays the output out as the kernels do (cat differs on layouts that
    # size-1 dims make ambiguous).
    out = torch.cat([torch.relu(x), torch.relu(-x)], dim)
    out = out.contiguous(memory_format=output_memory_format(x))
    mask = _packed_mask(x) if save_mask else x.new_empty((0,), dtype=torch.uint8)
    return out, mask


def _register_decompositions() -> None:
    for name in FORWARD_OPS:
        if hasattr(torch.ops.crelu_ext, name):
            op = getattr(torch.ops.crelu_ext, name).default
            torch._decomp.register_decomposition(op)(_crelu_composition)


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
    """Makes both exporters export the crelu ops; called once, at import."""
    _register_decompositions()
    if "torch.onnx" in sys.modules:
        _register_torchscript_symbolics(sys.modules["torch.onnx"])
    else:
        sys.meta_path.insert(0, _WhenTorchOnnxImported())


register()
