"""The Triton backend: the same exact op as fused Triton kernels.

Registered with ``torch.library.triton_op`` so that ``torch.compile`` traces
into the kernels. They follow the layout plan and mask layout of csrc/crelu.h:
a program handles BLOCK consecutive input elements of the [outer, inner]
plan, element i = o * inner + r going to out[o][0][r] and out[o][1][r], which
sit at i + o * inner and that plus inner.

Two traps of writing this in Triton: ``tl.maximum`` drops NaN, so relu is a
``tl.where`` on a comparison (false for NaN); and unary minus lowers to
``0 - x``, which gives +0 for x = +0 where eager gives -0, so negation is a
multiplication by -1 (exact, and it flips the sign of zero).

Triton kernels run on CPU tensors only in the interpreter, selected by
``TRITON_INTERPRET=1`` when this module is imported: that is how CI tests
them.
"""

import os
from unittest import mock

import torch
from torch._subclasses.fake_tensor import is_fake

from ._autograd import call_forward, register_crelu_autograd
from ._layout import (
    allocate_backward,
    allocate_backward_backward,
    allocate_forward,
    check_input,
    output_memory_format,
    plan_layout,
)

try:
    import triton
    import triton.language as tl
except ImportError as error:
    TRITON_IMPORT_ERROR: ImportError | None = error
else:
    TRITON_IMPORT_ERROR = None

# triton.jit reads this once, when the kernels below are defined.
INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"

NUM_WARPS = 4
# Elements per program, by element size: 4 KB of input, 16 bytes per thread.
BLOCK_BY_ELEMENT_SIZE = {2: 2048, 4: 1024, 8: 512}


def triton_available(device: torch.device) -> bool:
    if TRITON_IMPORT_ERROR is not None:
        return False
    if device.type == "cuda":
        return torch.cuda.is_available()
    return device.type == "cpu" and INTERPRETING


if TRITON_IMPORT_ERROR is None:

    @triton.jit
    def _negate(x):
        # -x flips the sign bit, as eager's neg does; `-x` would be 0 - x.
        return (x * -1.0).to(x.dtype)

    @triton.jit
    def _to_acc(x):
        # The accumulation type of eager's add: float32 for 16-bit types.
        if x.dtype == tl.float64:
            return x
        else:
            return x.to(tl.float32)

    @triton.jit
    def _pack_bits(flags, BLOCK: tl.constexpr):
        # One uint32 word per 32 consecutive flags, flag k in bit k. The bits
        # are distinct, so the sum is their OR.
        lane = (tl.arange(0, BLOCK) % 32).to(tl.uint32)
        bits = flags.to(tl.uint32) << lane
        return tl.sum(tl.reshape(bits, (BLOCK // 32, 32)), axis=1).to(tl.int32, bitcast=True)

    @triton.jit
    def _unpack_bits(words_ptr, offsets, valid, WORD: tl.constexpr):
        # Flag of each element from its block's word (WORD 0: pos, 1: neg).
        word = tl.load(words_ptr + 2 * (offsets // 32) + WORD, mask=valid, other=0)
        return ((word >> (offsets % 32).to(tl.int32)) & 1) != 0

    @triton.jit
    def _crelu_forward_kernel(
        x_ptr, out_ptr, mask_ptr, numel, inner, WRITE_MASK: tl.constexpr, BLOCK: tl.constexpr
    ):
        start = tl.program_id(0).to(tl.int64) * BLOCK
        offsets = start + tl.arange(0, BLOCK)
        valid = offsets < numel
        x = tl.load(x_ptr + offsets, mask=valid, other=0.0)
        pos_offsets = offsets + (offsets // inner) * inner
        zero = tl.zeros_like(x)
        tl.store(out_ptr + pos_offsets, tl.where(x < 0, zero, x), mask=valid)
        tl.store(out_ptr + pos_offsets + inner, tl.where(x > 0, zero, _negate(x)), mask=valid)
        if WRITE_MASK:
            is_nan = x != x
            blocks = start // 32 + tl.arange(0, BLOCK // 32)
            block_valid = blocks * 32 < numel
            pos_words = _pack_bits(valid & ((x > 0) | is_nan), BLOCK)
            neg_words = _pack_bits(valid & ((x < 0) | is_nan), BLOCK)
            tl.store(mask_ptr + 2 * blocks, pos_words, mask=block_valid)
            tl.store(mask_ptr + 2 * blocks + 1, neg_words, mask=block_valid)

    @triton.jit
    def _crelu_backward_kernel(grad_ptr, mask_ptr, grad_x_ptr, numel, inner, BLOCK: tl.constexpr):
        offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        valid = offsets < numel
        pos_offsets = offsets + (offsets // inner) * inner
        g1 = _to_acc(tl.load(grad_ptr + pos_offsets, mask=valid, other=0.0))
        g2 = _to_acc(tl.load(grad_ptr + pos_offsets + inner, mask=valid, other=0.0))
        pos = _unpack_bits(mask_ptr, offsets, valid, 0)
        neg = _unpack_bits(mask_ptr, offsets, valid, 1)
        zero = tl.zeros_like(g1)
        # grad_x = t1 + (-t2), as autograd sums the two paths.
        grad_x = tl.where(pos, g1, zero) + _negate(tl.where(neg, g2, zero))
        tl.store(grad_x_ptr + offsets, grad_x.to(grad_x_ptr.dtype.element_ty), mask=valid)

    @triton.jit
    def _crelu_backward_backward_kernel(
        gg_ptr, mask_ptr, out_ptr, numel, inner, BLOCK: tl.constexpr
    ):
        offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        valid = offsets < numel
        g = tl.load(gg_ptr + offsets, mask=valid, other=0.0)
        pos = _unpack_bits(mask_ptr, offsets, valid, 0)
        neg = _unpack_bits(mask_ptr, offsets, valid, 1)
        zero = tl.zeros_like(g)
        # (pos ? g : 0) + 0, written without the addition, which a compiler
        # may fold: the + 0 only turns -0 into +0.
        nonzero = g != 0
        pos_offsets = offsets + (offsets // inner) * inner
        tl.store(out_ptr + pos_offsets, tl.where(pos & nonzero, g, zero), mask=valid)
        tl.store(
            out_ptr + pos_offsets + inner, tl.where(neg & nonzero, _negate(g), zero), mask=valid
        )


def _launch(kernel, numel: int, element_size: int, *args, **constexprs) -> None:
    block = BLOCK_BY_ELEMENT_SIZE[element_size]
    grid = (triton.cdiv(numel, block),)
    if INTERPRETING:
        # The interpreter's kernels are Python functions that wrap_triton does
        # not take, so do here what it does for fake tensors: launch nothing.
        if any(is_fake(arg) for arg in args):
            return
        launcher = kernel
    else:
        launcher = torch.library.wrap_triton(kernel)  # visible to torch.compile
    launcher[grid](*args, numel, **constexprs, BLOCK=block, num_warps=NUM_WARPS)


def _mask_words(mask: torch.Tensor) -> torch.Tensor:
    return mask.view(torch.int32)


def _launch_masked(kernel, source, mask, out, x_like, dim, memory_format) -> None:
    """The backward and double-backward launch: ``x_like`` is whichever of ``source``
    and ``out`` has x's shape, which the plan and the grid follow."""
    if x_like.numel() == 0:
        return
    _, inner = plan_layout(x_like.shape, dim, memory_format)
    _launch(
        kernel,
        x_like.numel(),
        x_like.element_size(),
        source.contiguous(memory_format=memory_format),
        _mask_words(mask),
        out,
        inner=inner,
    )


def _triton_op_with_schema(name: str, schema: str):
    """``torch.library.triton_op`` with the schema given. torch before 2.14 takes
    the ``schema`` argument but infers one from the annotations anyway, and that
    cannot express a memory format; there, its inference answers ``schema``."""
    define = torch.library.triton_op(name, mutates_args=(), schema=schema)
    if torch.torch_version.TorchVersion(torch.__version__) >= (2, 14):
        return define

    def define_with_schema(fn):
        with mock.patch.object(torch._library.triton, "infer_schema", lambda *_, **__: schema):
            return define(fn)

    return define_with_schema


def _define_ops() -> None:
    @torch.library.triton_op("crelu_ext::triton_crelu", mutates_args=())
    def triton_crelu(
        x: torch.Tensor, dim: int, save_mask: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        dim = check_input(x, dim, "triton_crelu")
        out, mask = allocate_forward(x, dim, save_mask)
        if x.numel() > 0:
            memory_format = output_memory_format(x)
            _, inner = plan_layout(x.shape, dim, memory_format)
            _launch(
                _crelu_forward_kernel,
                x.numel(),
                x.element_size(),
                x.contiguous(memory_format=memory_format),
                out,
                _mask_words(mask) if save_mask else out,  # never read without the mask
                inner=inner,
                WRITE_MASK=save_mask,
            )
        return out, mask

    # torch cannot infer a schema with a memory format, so these two spell theirs out.
    masked_schema = "(Tensor {}, Tensor mask, int dim, MemoryFormat memory_format) -> Tensor"

    @_triton_op_with_schema("crelu_ext::triton_crelu_backward", masked_schema.format("grad_out"))
    def triton_crelu_backward(
        grad_out: torch.Tensor, mask: torch.Tensor, dim: int, memory_format: torch.memory_format
    ) -> torch.Tensor:
        dim = check_input(grad_out, dim, "triton_crelu_backward")
        grad_x = allocate_backward(grad_out, dim, memory_format)
        _launch_masked(_crelu_backward_kernel, grad_out, mask, grad_x, grad_x, dim, memory_format)
        return grad_x

    @_triton_op_with_schema(
        "crelu_ext::triton_crelu_backward_backward", masked_schema.format("grad_grad_x")
    )
    def triton_crelu_backward_backward(
        grad_grad_x: torch.Tensor, mask: torch.Tensor, dim: int, memory_format: torch.memory_format
    ) -> torch.Tensor:
        dim = check_input(grad_grad_x, dim, "triton_crelu_backward_backward")
        out = allocate_backward_backward(grad_grad_x, dim, memory_format)
        _launch_masked(
            _crelu_backward_backward_kernel, grad_grad_x, mask, out, grad_grad_x, dim, memory_format
        )
        return out

    register_crelu_autograd(
        "triton_crelu", "triton_crelu_backward", "triton_crelu_backward_backward"
    )


def crelu(x: torch.Tensor, dim: int) -> torch.Tensor:
    """The Triton forward."""
    return call_forward(torch.ops.crelu_ext.triton_crelu, x, dim)


if TRITON_IMPORT_ERROR is None:
    _define_ops()
