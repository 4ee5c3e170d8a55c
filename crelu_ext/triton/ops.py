"""The Triton backend: the same exact op as fused Triton kernels.

Registered with ``torch.library.triton_op`` so that ``torch.compile`` traces
into the kernels. They follow the layout plan and mask layout of csrc/crelu.h:
a program handles BLOCK consecutive input elements of the [outer, inner]
plan, element i = o * inner + r going to out[o][0][r] and out[o][1][r], which
sit at i + o * inner and that plus inner. A program's elements are a
[BLOCK // 32, 32] tile, one mask block per row, so mask words are whole and
written by one program. The program divides once to find its first row; its
elements find theirs with a multiply-high, as the CUDA kernels' IntDivider
does. When rows are whole 16-byte vectors and the pointers are aligned (the
CUDA launcher's condition), hints let every access be 128 bits wide.
tools/codegen_check.py checks the generated code without a GPU.

Two traps of writing this in Triton: ``tl.maximum`` drops NaN, so relu is a
``tl.where`` on a comparison (false for NaN); and unary minus lowers to
``0 - x``, which gives +0 for x = +0 where eager gives -0, so negation is a
multiplication by -1 (exact, and it flips the sign of zero).

Triton kernels run on CPU tensors only in the interpreter, selected by
``TRITON_INTERPRET=1`` when this module is imported: that is how CI tests
them.
"""

import os
from typing import NamedTuple

import torch
from torch._subclasses.fake_tensor import is_fake

from .._autograd import call_forward, register_crelu_autograd
from .._checks import check_input
from .._layout import (
    allocate_backward,
    allocate_backward_backward,
    allocate_forward,
    output_memory_format,
    plan_layout,
)
from .._vmap import register_vmap_rules

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
# Elements per program, by element size: 4 KB of input, 32 bytes per thread.
BLOCK_BY_ELEMENT_SIZE = {2: 2048, 4: 1024, 8: 512}
VECTOR_BYTES = 16  # one 128-bit load or store
INT32_MAX = 2**31 - 1


class TritonGrid(NamedTuple):
    """How the kernels walk an [outer, inner] plan: ``grid`` programs of
    ``BLOCK`` consecutive input elements, and the arguments that find each
    element's row without dividing per element."""

    grid: tuple[int]
    row_magic: int  # see row_divider
    row_shift: int
    constexprs: dict


def row_divider(inner) -> tuple[int, int]:
    """``(magic, shift)`` with ``n // inner == (umulhi(n, magic) + n) >> shift``
    for ``0 <= n < 2**31`` (at::cuda::detail::IntDivider's method, which the
    CUDA kernels use). ``magic`` is given as the int32 of its 32 bits, so that
    the argument's type never changes. Written for the symbolic sizes of
    torch.compile too, where it guards only on inner's power-of-two range."""
    shift = 0
    while (1 << shift) < inner:
        shift += 1
    magic = (2**32 * ((1 << shift) - inner)) // inner + 1
    return magic - 2**32 * (magic // 2**31), shift


def plan_grid(numel: int, inner: int, element_size: int, aligned: bool) -> TritonGrid:
    """``aligned``: every tensor the kernel moves starts on 16 bytes."""
    block = BLOCK_BY_ELEMENT_SIZE[element_size]
    vector = VECTOR_BYTES // element_size
    # Past this, a program's local column index no longer fits in int32.
    wide_rows = bool(inner + 2 * block > INT32_MAX)
    magic, shift = (0, 0) if wide_rows else row_divider(inner)
    return TritonGrid(
        grid=((numel + block - 1) // block,),
        row_magic=magic,
        row_shift=shift,
        constexprs={
            "BLOCK": block,
            "VECTOR": vector,
            # A vector of x then never straddles two rows of the output.
            "ALIGNED": aligned and bool(inner % vector == 0),
            "WIDE_ROWS": wide_rows,
        },
    )


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
    def _program_tile(numel, BLOCK: tl.constexpr, VECTOR: tl.constexpr, ALIGNED: tl.constexpr):
        # The program's elements start + k, as a [BLOCK // 32, 32] tile k whose
        # row w is mask block start // 32 + w; count of them are in the tensor.
        start = tl.program_id(0).to(tl.int64) * BLOCK
        word = tl.arange(0, BLOCK // 32)
        lane = tl.arange(0, 32)
        k = word[:, None] * 32 + lane[None, :]
        count = tl.minimum(numel - start, BLOCK).to(tl.int32)
        if ALIGNED:
            count = tl.multiple_of(count, VECTOR)  # numel is a multiple of inner
        return start, word, lane, k, count

    @triton.jit
    def _pair_offsets(
        start,
        k,
        inner,
        row_magic,
        row_shift,
        VECTOR: tl.constexpr,
        ALIGNED: tl.constexpr,
        WIDE_ROWS: tl.constexpr,
    ):
        # Element start + k of x, at row o and column r, has its out[o][0][r] at
        # pos_base + rel and its out[o][1][r] at neg_base + rel. The only
        # division is per program; per element, the rows crossed since `start`
        # come from a multiply-high (or one comparison, for rows longer than
        # 2**31 - 2 BLOCK, which a program crosses at most once).
        row = start // inner
        column = start - row * inner
        pos_base = start + row * inner
        neg_base = pos_base + inner
        if WIDE_ROWS:
            rel = k + tl.where(column + k >= inner, inner, 0)
        else:
            n = (column.to(tl.int32) + k).to(tl.uint32)
            magic = row_magic.to(tl.uint32, bitcast=True)
            rows_crossed = (tl.umulhi(n, magic) + n) >> row_shift.to(tl.uint32)
            rel = k + rows_crossed.to(tl.int32) * inner.to(tl.int32)
        if ALIGNED:
            # Rows are whole vectors, so each vector of x lands whole in a row.
            pos_base = tl.multiple_of(pos_base, VECTOR)
            neg_base = tl.multiple_of(neg_base, VECTOR)
            rel = tl.max_contiguous(tl.multiple_of(rel, [1, VECTOR]), [1, VECTOR])
        return pos_base, neg_base, rel

    @triton.jit
    def _mask_offsets(start, word):
        # The [BLOCK // 32, 2] int32 words (pos, neg) of the program's blocks.
        return start // 16 + (2 * word[:, None] + tl.arange(0, 2)[None, :])

    @triton.jit
    def _store_mask(mask_ptr, start, word, lane, count, pos, neg):
        # Bit l of a block's words is the flag of its lane l. The bits are
        # distinct, so their sum is their OR.
        pos_word = tl.sum(pos.to(tl.uint32) << lane[None, :].to(tl.uint32), axis=1)
        neg_word = tl.sum(neg.to(tl.uint32) << lane[None, :].to(tl.uint32), axis=1)
        words = tl.join(pos_word, neg_word).to(tl.int32, bitcast=True)
        tl.store(mask_ptr + _mask_offsets(start, word), words, mask=(word * 32 < count)[:, None])

    @triton.jit
    def _load_mask(mask_ptr, start, word, lane, count):
        # Each block's two words, loaded once for its 32 elements.
        words = tl.load(
            mask_ptr + _mask_offsets(start, word), mask=(word * 32 < count)[:, None], other=0
        )
        pos_word, neg_word = tl.split(words)
        pos = ((pos_word[:, None] >> lane[None, :]) & 1) != 0
        neg = ((neg_word[:, None] >> lane[None, :]) & 1) != 0
        return pos, neg

    @triton.jit(do_not_specialize=["row_magic", "row_shift"])
    def _crelu_forward_kernel(
        x_ptr,
        out_ptr,
        mask_ptr,
        numel,
        inner,
        row_magic,
        row_shift,
        WRITE_MASK: tl.constexpr,
        BLOCK: tl.constexpr,
        VECTOR: tl.constexpr,
        ALIGNED: tl.constexpr,
        WIDE_ROWS: tl.constexpr,
    ):
        start, word, lane, k, count = _program_tile(numel, BLOCK, VECTOR, ALIGNED)
        valid = k < count
        x = tl.load(x_ptr + start + k, mask=valid, other=0.0)
        pos_base, neg_base, rel = _pair_offsets(
            start, k, inner, row_magic, row_shift, VECTOR, ALIGNED, WIDE_ROWS
        )
        zero = tl.zeros_like(x)
        tl.store(out_ptr + pos_base + rel, tl.where(x < 0, zero, x), mask=valid)
        tl.store(out_ptr + neg_base + rel, tl.where(x > 0, zero, _negate(x)), mask=valid)
        if WRITE_MASK:
            is_nan = x != x
            pos = valid & ((x > 0) | is_nan)
            neg = valid & ((x < 0) | is_nan)
            _store_mask(mask_ptr, start, word, lane, count, pos, neg)

    @triton.jit(do_not_specialize=["row_magic", "row_shift"])
    def _crelu_backward_kernel(
        grad_ptr,
        mask_ptr,
        grad_x_ptr,
        numel,
        inner,
        row_magic,
        row_shift,
        BLOCK: tl.constexpr,
        VECTOR: tl.constexpr,
        ALIGNED: tl.constexpr,
        WIDE_ROWS: tl.constexpr,
    ):
        start, word, lane, k, count = _program_tile(numel, BLOCK, VECTOR, ALIGNED)
        valid = k < count
        pos_base, neg_base, rel = _pair_offsets(
            start, k, inner, row_magic, row_shift, VECTOR, ALIGNED, WIDE_ROWS
        )
        g1 = _to_acc(tl.load(grad_ptr + pos_base + rel, mask=valid, other=0.0))
        g2 = _to_acc(tl.load(grad_ptr + neg_base + rel, mask=valid, other=0.0))
        pos, neg = _load_mask(mask_ptr, start, word, lane, count)
        zero = tl.zeros_like(g1)
        # grad_x = t1 + (-t2), as autograd sums the two paths.
        grad_x = tl.where(pos, g1, zero) + _negate(tl.where(neg, g2, zero))
        tl.store(grad_x_ptr + start + k, grad_x.to(grad_x_ptr.dtype.element_ty), mask=valid)

    @triton.jit(do_not_specialize=["row_magic", "row_shift"])
    def _crelu_backward_backward_kernel(
        gg_ptr,
        mask_ptr,
        out_ptr,
        numel,
        inner,
        row_magic,
        row_shift,
        BLOCK: tl.constexpr,
        VECTOR: tl.constexpr,
        ALIGNED: tl.constexpr,
        WIDE_ROWS: tl.constexpr,
    ):
        start, word, lane, k, count = _program_tile(numel, BLOCK, VECTOR, ALIGNED)
        valid = k < count
        g = tl.load(gg_ptr + start + k, mask=valid, other=0.0)
        pos, neg = _load_mask(mask_ptr, start, word, lane, count)
        pos_base, neg_base, rel = _pair_offsets(
            start, k, inner, row_magic, row_shift, VECTOR, ALIGNED, WIDE_ROWS
        )
        zero = tl.zeros_like(g)
        # (pos ? g : 0) + 0, written without the addition, which a compiler
        # may fold: the + 0 only turns -0 into +0.
        nonzero = g != 0
        tl.store(out_ptr + pos_base + rel, tl.where(pos & nonzero, g, zero), mask=valid)
        tl.store(out_ptr + neg_base + rel, tl.where(neg & nonzero, _negate(g), zero), mask=valid)


def _is_aligned(tensor: torch.Tensor) -> bool:
    if is_fake(tensor):
        # No address while torch.compile traces: its storages start aligned
        # (Inductor copies graph inputs that do not), so the offset decides.
        return tensor.storage_offset() * tensor.element_size() % VECTOR_BYTES == 0
    return tensor.data_ptr() % VECTOR_BYTES == 0


def _launch(
    kernel, numel: int, element_size: int, *tensors, inner: int, traced: bool, **constexprs
) -> None:
    """Launches ``kernel(*tensors, numel, inner, ...)`` over the [numel // inner,
    inner] plan; ``tensors`` are the dense ones it reads and writes. ``traced``:
    the launch is in a triton_op, which torch.compile traces into."""
    data = [t for t in tensors if t.dtype != torch.int32]  # mask words move as they are
    plan = plan_grid(numel, inner, element_size, all(map(_is_aligned, data)))
    launcher = kernel
    if INTERPRETING:
        # The interpreter's kernels are Python functions that wrap_triton does
        # not take, so do here what it does for fake tensors: launch nothing.
        if any(is_fake(t) for t in tensors):
            return
    elif traced:
        launcher = torch.library.wrap_triton(kernel)  # visible to torch.compile
    launcher[plan.grid](
        *tensors,
        numel,
        inner,
        plan.row_magic,
        plan.row_shift,
        **constexprs,
        **plan.constexprs,
        num_warps=NUM_WARPS,
    )


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
        traced=False,
    )


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
                traced=True,
                WRITE_MASK=save_mask,
            )
        return out, mask

    # The backward ops take a memory format, which torch.library.triton_op cannot
    # infer from annotations (and before torch 2.14 infers even when given a
    # schema), so they are custom ops with their schemas spelled out: opaque to
    # torch.compile, which calls them as they are.
    masked_schema = "(Tensor {}, Tensor mask, int dim, MemoryFormat memory_format) -> Tensor"

    @torch.library.custom_op(
        "crelu_ext::triton_crelu_backward", mutates_args=(), schema=masked_schema.format("grad_out")
    )
    def triton_crelu_backward(grad_out, mask, dim, memory_format):
        dim = check_input(grad_out, dim, "triton_crelu_backward")
        grad_x = allocate_backward(grad_out, dim, memory_format)
        _launch_masked(_crelu_backward_kernel, grad_out, mask, grad_x, grad_x, dim, memory_format)
        return grad_x

    @torch.library.custom_op(
        "crelu_ext::triton_crelu_backward_backward",
        mutates_args=(),
        schema=masked_schema.format("grad_grad_x"),
    )
    def triton_crelu_backward_backward(grad_grad_x, mask, dim, memory_format):
        dim = check_input(grad_grad_x, dim, "triton_crelu_backward_backward")
        out = allocate_backward_backward(grad_grad_x, dim, memory_format)
        _launch_masked(
            _crelu_backward_backward_kernel, grad_grad_x, mask, out, grad_grad_x, dim, memory_format
        )
        return out

    @triton_crelu_backward.register_fake
    def _(grad_out, mask, dim, memory_format):
        dim = check_input(grad_out, dim, "triton_crelu_backward")
        return allocate_backward(grad_out, dim, memory_format)

    @triton_crelu_backward_backward.register_fake
    def _(grad_grad_x, mask, dim, memory_format):
        dim = check_input(grad_grad_x, dim, "triton_crelu_backward_backward")
        return allocate_backward_backward(grad_grad_x, dim, memory_format)

    register_crelu_autograd(
        "triton_crelu", "triton_crelu_backward", "triton_crelu_backward_backward"
    )
    register_vmap_rules("triton_crelu", "triton_crelu_backward", "triton_crelu_backward_backward")


def crelu(x: torch.Tensor, dim: int) -> torch.Tensor:
    """The Triton forward."""
    return call_forward(torch.ops.crelu_ext.triton_crelu, x, dim)


if TRITON_IMPORT_ERROR is None:
    _define_ops()
