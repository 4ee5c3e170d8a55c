"""The layout plan and the outputs' allocation, mirroring csrc/ops.cpp for the
Python side (fake kernels and the Triton backend). See csrc/crelu.h for the plan."""

import math

import torch

# Private: torch has no public test for "non-overlapping and dense", and this
# variant adds no guards on symbolic sizes under torch.compile.
try:
    from torch._prims_common import is_non_overlapping_and_dense_or_false as _is_dense
except ImportError:  # torch before 2.13
    from torch._prims_common import is_non_overlapping_and_dense as _is_dense

MASK_BLOCK = 32  # elements per mask block
MASK_BLOCK_BYTES = 8  # a uint32 word of "x > 0 or NaN" bits, then one of "x < 0 or NaN"


def mask_bytes(numel):
    return (numel + MASK_BLOCK - 1) // MASK_BLOCK * MASK_BLOCK_BYTES


# c10's stride rules, copied: torch.cat on the composition of a meta tensor with
# x's sizes and strides costs ~10 ms per call (relu's meta kernel is a Python
# ref), and its strides differ from the CPU's for ambiguous layouts such as
# sizes (1, 2, 2, 1) with strides (1000, 1, 2, 1000).


def _is_channels_last_strides(sizes, strides, order) -> bool:
    # c10::is_channels_last_strides_2d_s4 / _3d_s5: `order` lists the dims
    # from innermost (channels) to outermost (batch).
    if strides[1] == 0:
        return False
    lowest = 0
    for d in order:
        if sizes[d] == 0 or strides[d] < lowest:
            return False
        if d == 0 and lowest == strides[1]:
            return False  # ambiguous N111-like layouts count as contiguous
        lowest = strides[d] * (sizes[d] if sizes[d] > 1 else 1)
    return True


def _suggest_memory_format(sizes, strides) -> torch.memory_format:
    # TensorBase::suggest_memory_format for a tensor of these sizes and strides.
    if len(sizes) == 4 and _is_channels_last_strides(sizes, strides, (1, 3, 2, 0)):
        return torch.channels_last
    if len(sizes) == 5 and _is_channels_last_strides(sizes, strides, (1, 4, 3, 2, 0)):
        return torch.channels_last_3d
    return torch.contiguous_format


def _is_contiguous_strides(sizes, strides, order=None) -> bool:
    # c10's compute_contiguous (and, with `order` innermost first, its
    # channels_last variants): dims of size 1 may have any stride.
    expected = 1
    for d in reversed(range(len(sizes))) if order is None else order:
        if sizes[d] != 1:
            if strides[d] != expected:
                return False
            expected *= sizes[d]
    return True


def _dense_strides_in_stride_order(sizes, strides) -> list:
    # at::infer_dense_strides: the dense strides TensorIterator gives the output
    # of an element-wise op on a tensor that is not dense (an insertion sort
    # of the dims by stride that leaves stride-0 dims where they are).
    ndim = len(sizes)
    perm = list(reversed(range(ndim)))  # innermost first
    for i in range(1, ndim):
        inner = i
        for outer in range(i - 1, -1, -1):
            a, b = perm[outer], perm[inner]
            if strides[a] == 0 or strides[b] == 0:
                comparison = 0
            elif strides[a] != strides[b]:
                comparison = 1 if strides[a] > strides[b] else -1
            else:
                comparison = 1 if sizes[a] > sizes[b] else 0
            if comparison > 0:
                perm[outer], perm[inner] = perm[inner], perm[outer]
                inner = outer
            elif comparison < 0:
                break
    dense = [0] * ndim
    step = 1
    for d in perm:
        dense[d] = step
        step *= max(sizes[d], 1)
    return dense


def output_memory_format(x: torch.Tensor) -> torch.memory_format:
    """The memory format of ``torch.cat([relu(x), relu(-x)], dim)``, for every
    dim. torch.cat allocates its output in the format its inputs' strides
    suggest, contiguous unless all agree; relu and neg lay out their outputs by
    TensorIterator's rules: canonical strides when the input is contiguous
    (checked first: size-1 dims make a tensor both) or channels_last
    contiguous, the input's strides when it is otherwise dense, else dense
    strides in the input's stride order. relu(-x) applies those rules twice.
    csrc/ops.cpp has the same function."""
    if x.dim() not in (4, 5) or x.is_contiguous():
        return torch.contiguous_format
    if _is_dense(x):
        # From the strides: a tensor under vmap cannot be asked for channels_last.
        if x.dim() == 4 and _is_contiguous_strides(x.shape, x.stride(), (1, 3, 2, 0)):
            return torch.channels_last
        return _suggest_memory_format(x.shape, x.stride())
    strides = _dense_strides_in_stride_order(x.shape, x.stride())
    if _is_contiguous_strides(x.shape, strides):
        return torch.contiguous_format  # relu(-x) gets canonical contiguous strides
    return _suggest_memory_format(x.shape, strides)


def memory_order(ndim: int, memory_format: torch.memory_format) -> tuple[int, ...]:
    """The dims in memory order, outermost first."""
    if memory_format == torch.channels_last:
        return (0, 2, 3, 1)
    if memory_format == torch.channels_last_3d:
        return (0, 2, 3, 4, 1)
    return tuple(range(ndim))


def plan_layout(shape, dim: int, memory_format: torch.memory_format) -> tuple[int, int]:
    """``(outer, inner)``: x in memory order seen as an [outer, inner] matrix,
    the output as [outer, 2, inner]."""
    order = memory_order(len(shape), memory_format)
    split = order.index(dim)
    return math.prod(shape[d] for d in order[:split]), math.prod(shape[d] for d in order[split:])


def scaled_shape(shape, dim: int, numerator: int, denominator: int) -> list:
    scaled = list(shape)
    scaled[dim] = scaled[dim] * numerator // denominator
    return scaled


def _empty(shape, like: torch.Tensor, memory_format: torch.memory_format) -> torch.Tensor:
    return torch.empty(shape, dtype=like.dtype, device=like.device, memory_format=memory_format)


# The outputs of the three ops, as every backend allocates them (and the fake
# kernels describe them): the strides torch.cat gives, the mask's byte count.


def allocate_forward(x: torch.Tensor, dim: int, save_mask: bool):
    out = _empty(scaled_shape(x.shape, dim, 2, 1), x, output_memory_format(x))
    mask = x.new_empty((mask_bytes(x.numel()) if save_mask else 0,), dtype=torch.uint8)
    return out, mask


def allocate_backward(grad_out: torch.Tensor, dim: int, memory_format: torch.memory_format):
    return _empty(scaled_shape(grad_out.shape, dim, 1, 2), grad_out, memory_format)


def allocate_backward_backward(
    grad_grad_x: torch.Tensor, dim: int, memory_format: torch.memory_format
):
    return _empty(scaled_shape(grad_grad_x.shape, dim, 2, 1), grad_grad_x, memory_format)
