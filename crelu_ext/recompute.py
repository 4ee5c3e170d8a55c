"""``crelu_ext.recompute()``: the layer after a CReLU keeps CReLU's input, half
the size of its output, and backward recomputes the output with the fused op.

The fused op itself saves only a 2-bit mask, but the layer after it (a conv, a
linear layer, a pooling) saves its own input, the CReLU output, twice the size
of CReLU's input. Inside the context, a tensor that autograd saves and that is
the output of a fused CReLU (a ``crelu_ext.CReLU`` module or an idiom that
``crelu_ext.fuse`` rewrote) produced inside the context is kept as CReLU's
input instead, and recomputed bit for bit when backward needs it.
"""

import weakref

import torch
from torch.utils.weak import WeakIdKeyDictionary

from .functional import crelu

# CReLU outputs produced inside the context -> (input, dim, input's version,
# output's version). Weak keys: an entry lives as long as its output.
_OUTPUTS = WeakIdKeyDictionary()
_DEPTH = [0]  # how many recompute() contexts are open


class _Kept:
    """What the pack hook keeps for a CReLU output: its input, packed as the
    hooks outside the context would pack it, and what backward checks."""

    __slots__ = ("dim", "input", "input_version", "output", "output_version")

    def __init__(self, packed_input, dim, input_version, output, output_version) -> None:
        self.input, self.dim, self.input_version = packed_input, dim, input_version
        self.output, self.output_version = weakref.ref(output), output_version


def track(x: torch.Tensor, dim: int, out: torch.Tensor) -> torch.Tensor:
    """Records ``out = crelu(x, dim)`` for the pack hook, inside the context."""
    if _DEPTH[0] and torch.is_grad_enabled() and not torch.compiler.is_compiling():
        _OUTPUTS[out] = (x, dim, x._version, out._version)
    return out


def _modified(what: str, before: int, now: int) -> RuntimeError:
    return RuntimeError(
        f"crelu_ext.recompute: {what} was modified in place after the forward saved it "
        f"(version {before}, now {now}), so backward cannot recompute CReLU's output; "
        "leave that tensor alone until backward, or run the forward outside "
        "crelu_ext.recompute()"
    )


class recompute(torch.autograd.graph.saved_tensors_hooks):
    """Inside ``with crelu_ext.recompute():``, autograd keeps the input of each
    fused CReLU whose output a later op saves, and recomputes that output
    (bitwise, with the fused op) when backward needs it.

    Works with hooks opened before it (an outer ``saved_tensors_hooks`` sees
    the tensors this one keeps). Backward raises a RuntimeError if CReLU's
    input was modified in place after the forward, as autograd does for a
    tensor it saved. Eager mode only: under ``torch.compile`` it keeps what
    autograd keeps.
    """

    def __init__(self) -> None:
        super().__init__(self._pack, self._unpack)
        self._outer = None

    def __enter__(self):
        # Nested saved_tensors_hooks replace the outer ones; chaining to them
        # keeps an outer pair (crelu_ext._memory.saved_bytes, say) working.
        self._outer = torch._C._autograd._top_saved_tensors_default_hooks(False)
        super().__enter__()
        _DEPTH[0] += 1
        return self

    def __exit__(self, *args) -> None:
        _DEPTH[0] -= 1
        super().__exit__(*args)

    def _pack(self, t: torch.Tensor):
        outer_pack = (lambda t: t) if self._outer is None else self._outer[0]
        entry = _OUTPUTS.get(t)
        if entry is None or t._version != entry[3]:  # an output written since: kept as is
            return outer_pack(t)
        x, dim, input_version, output_version = entry
        return _Kept(outer_pack(x), dim, input_version, t, output_version)

    def _unpack(self, packed) -> torch.Tensor:
        outer_unpack = (lambda t: t) if self._outer is None else self._outer[1]
        if not isinstance(packed, _Kept):
            return outer_unpack(packed)
        x = outer_unpack(packed.input)
        if x._version != packed.input_version:
            raise _modified("the input of a CReLU", packed.input_version, x._version)
        output = packed.output()  # autograd's own check, where the output still lives
        if output is not None and output._version != packed.output_version:
            raise _modified("the output of a CReLU", packed.output_version, output._version)
        return crelu(x, packed.dim)
