"""Batching rules for ``torch.vmap`` (and so ``vmap(grad)``, ``jacrev``,
``jacfwd``, ``hessian``): each op runs once on the whole batch instead of once
per sample, and gives what the per-sample calls give, bit for bit, mask
included.

A sample's mask packs its elements in the memory order of its layout (csrc/crelu.h).
Each rule lays the batch out as ``[batch, sample dims in that memory order]``,
contiguous, so that the batch is one dense tensor whose memory order is the
samples' one after the other, and runs the op on it with
``torch.contiguous_format``. The whole batch's mask is then the samples' masks
end to end, but for each sample's padding to a whole 32-element block: when a
sample's size is not a multiple of 32 the rules repack the bits.

A call the op would reject (a wrong mask, dim or memory format) runs per sample,
so that the error is the op's own for a single sample.

Each rule takes what a torch.library.register_vmap rule takes, with the batch
size for the info object; _register_batched_kernel registers it.
"""

import math

import torch

from ._checks import FLOAT_DTYPES
from ._layout import MASK_BLOCK, mask_bytes, memory_order, output_memory_format

_MEMORY_FORMATS = (torch.contiguous_format, torch.channels_last, torch.channels_last_3d)
_BIT_SHIFTS = {}  # device -> arange(8) as uint8


def _bit_shifts(device: torch.device) -> torch.Tensor:
    shifts = _BIT_SHIFTS.get(device)
    if shifts is None:
        shifts = _BIT_SHIFTS[device] = torch.arange(8, dtype=torch.uint8, device=device)
    return shifts


def _unpack(mask: torch.Tensor, count: int) -> torch.Tensor:
    """``[..., bytes]`` packed masks -> ``[..., 2, count]`` bits (pos, neg) as uint8.
    A block is a little-endian uint32 of pos bits, then one of neg bits."""
    *lead, size = mask.shape
    blocks = size // 8
    bits = mask.reshape(*lead, blocks, 2, 4, 1) >> _bit_shifts(mask.device) & 1
    bits = bits.reshape(*lead, blocks, 2, MASK_BLOCK).transpose(-3, -2)
    return bits.reshape(*lead, 2, blocks * MASK_BLOCK)[..., :count]


def _pack(bits: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`_unpack`, with zeros in the last block's padding, as
    the kernels write it."""
    *lead, _, count = bits.shape
    blocks = -(-count // MASK_BLOCK)
    bits = torch.nn.functional.pad(bits, (0, blocks * MASK_BLOCK - count))
    bits = bits.reshape(*lead, 2, blocks, 4, 8).transpose(-4, -3)
    packed = (bits << _bit_shifts(bits.device)).sum(-1, dtype=torch.uint8)
    return packed.reshape(*lead, blocks * 8)


def _join_masks(masks: torch.Tensor, numel: int) -> torch.Tensor:
    """``[batch, mask_bytes(numel)]`` per-sample masks -> the mask of the batch."""
    if numel % MASK_BLOCK == 0:
        return masks.reshape(-1)
    batch = masks.shape[0]
    return _pack(_unpack(masks, numel).transpose(0, 1).reshape(2, batch * numel))


def _split_mask(mask: torch.Tensor, batch: int, numel: int) -> torch.Tensor:
    """The inverse of :func:`_join_masks`."""
    if numel % MASK_BLOCK == 0:
        return mask.view(batch, mask_bytes(numel))
    return _pack(_unpack(mask, batch * numel).reshape(2, batch, numel).transpose(0, 1))


def _sample(batched: torch.Tensor) -> torch.Tensor:
    """A meta tensor with one sample's sizes and strides (the batch dim first):
    vmap cannot tell whether a batched tensor is channels_last."""
    return torch.empty_strided(
        batched.shape[1:], batched.stride()[1:], dtype=batched.dtype, device="meta"
    )


def _in_memory_order(batched: torch.Tensor, order) -> torch.Tensor:
    """``[batch, *sample]`` -> ``[batch, *sample dims in order]``, contiguous."""
    return batched.permute(0, *(d + 1 for d in order)).contiguous()


def _from_memory_order(batched: torch.Tensor, order) -> torch.Tensor:
    """The inverse of :func:`_in_memory_order`'s permutation (a view)."""
    inverse = [0] * len(order)
    for position, d in enumerate(order):
        inverse[d] = position + 1
    return batched.permute(0, *inverse)


def _batched(tensor: torch.Tensor, in_dim, batch: int) -> torch.Tensor:
    if in_dim is None:
        return tensor.expand(batch, *tensor.shape)
    return tensor.movedim(in_dim, 0)


def _per_sample(op, batch: int, tensors, *args):
    """``op`` sample by sample (batch dim first), each output stacked: for calls
    the op rejects, so that it raises its own error. An empty batch goes
    through the op's fake kernel, which checks what it can and gives the shapes."""
    if batch == 0:
        outputs = op(*(_sample(t) for t in tensors), *args)
        device = tensors[0].device
        if isinstance(outputs, tuple):
            return tuple(torch.empty(0, *o.shape, dtype=o.dtype, device=device) for o in outputs)
        return torch.empty(0, *outputs.shape, dtype=outputs.dtype, device=device)
    results = [op(*(t[b] for t in tensors), *args) for b in range(batch)]
    if isinstance(results[0], tuple):
        return tuple(torch.stack(outputs) for outputs in zip(*results, strict=True))
    return torch.stack(results)


def _valid_dim(tensor: torch.Tensor, dim) -> bool:
    ndim = tensor.dim() - 1  # a sample's
    return (
        tensor.dtype in FLOAT_DTYPES
        and ndim > 0
        and isinstance(dim, int)
        and not isinstance(dim, bool)
        and -ndim <= dim < ndim
    )


# torch.library.register_vmap registers a Python kernel at FuncTorchBatched
# through a generic wrapper (pytrees over arguments and outputs, an info object);
# this one does the same unwrapping and wrapping with the private functorch calls
# that wrapper makes: vmap(grad) over 64 (256,) samples ran 1.2-1.9x faster this way.
_FUNCTORCH = torch._C._functorch
_BATCHED_KEY = torch._C.DispatchKeySet(torch._C.DispatchKey.FuncTorchBatched)
_LIBRARIES = []  # the registrations live as long as these


def _with_batch_dim(tensor: torch.Tensor, out_dim, level: int) -> torch.Tensor:
    return tensor if out_dim is None else _FUNCTORCH._add_batch_dim(tensor, out_dim, level)


def _register_batched_kernel(lib, name: str, rule, tensor_args: int) -> None:
    """Runs ``rule(batch_size, in_dims, *args)`` for ``crelu_ext::<name>`` when
    one of its first ``tensor_args`` arguments is batched at the current vmap
    level; ``rule`` returns ``(outputs, out_dims)`` as torch.library.register_vmap's
    rules do."""
    op = getattr(torch.ops.crelu_ext, name).default

    def kernel(*args):
        level = _FUNCTORCH.maybe_current_level()
        tensors, in_dims, batch = [], [], None
        for arg in args[:tensor_args]:
            tensor, in_dim = _FUNCTORCH._unwrap_batched(arg, level)
            tensors.append(tensor)
            in_dims.append(in_dim)
            if in_dim is not None:
                batch = tensor.shape[in_dim]
        with torch._C._ExcludeDispatchKeyGuard(_BATCHED_KEY):
            if batch is None:  # batched at outer levels only
                return op(*args)
            outputs, out_dims = rule(batch, in_dims, *tensors, *args[tensor_args:])
        if isinstance(outputs, tuple):
            return tuple(
                _with_batch_dim(o, d, level) for o, d in zip(outputs, out_dims, strict=True)
            )
        return _with_batch_dim(outputs, out_dims, level)

    lib.impl(name, kernel, "FuncTorchBatched")


def register_vmap_rules(forward: str, backward: str, backward_backward: str) -> None:
    """Registers batching rules for the ops ``crelu_ext::<forward>``, ``<backward>``
    and ``<backward_backward>`` (the schemas of csrc/ops.cpp)."""
    ops = torch.ops.crelu_ext
    forward_op = getattr(ops, forward).default
    backward_op = getattr(ops, backward).default
    backward_backward_op = getattr(ops, backward_backward).default

    def forward_rule(batch, in_dims, x, dim, save_mask):
        x = x.movedim(in_dims[0], 0)
        if not _valid_dim(x, dim):
            return _per_sample(forward_op, batch, (x,), dim, save_mask), (0, 0)
        sample = _sample(x)
        dim %= sample.dim()
        order = memory_order(sample.dim(), output_memory_format(sample))
        out, mask = forward_op(_in_memory_order(x, order), order.index(dim) + 1, save_mask)
        out = _from_memory_order(out, order)
        if not save_mask:
            return (out, mask), (0, None)  # empty, as each sample's
        return (out, _split_mask(mask, batch, sample.numel())), (0, 0)

    def masked_rule(op, halves):
        """crelu_backward (``halves``: its output has half the size at dim) and
        crelu_backward_backward."""

        def rule(batch, in_dims, grad, mask, dim, memory_format):
            grad_dim, mask_dim = in_dims
            grad = _batched(grad, grad_dim, batch)
            mask = _batched(mask, mask_dim, batch)
            ndim = grad.dim() - 1
            valid = (
                _valid_dim(grad, dim)
                and mask.dtype == torch.uint8
                and mask.dim() == 2
                and mask.device == grad.device
                and (mask.shape[1] <= 1 or mask.stride(1) == 1)
                and memory_format in _MEMORY_FORMATS
                and len(memory_order(ndim, memory_format)) == ndim
            )
            if valid:
                x_numel = math.prod(grad.shape[1:])
                if halves:
                    valid = grad.shape[dim % ndim + 1] % 2 == 0
                    x_numel //= 2
                valid = valid and mask.shape[1] == mask_bytes(x_numel)
            if not valid:
                return _per_sample(op, batch, (grad, mask), dim, memory_format), 0
            order = memory_order(ndim, memory_format)
            out = op(
                _in_memory_order(grad, order),
                _join_masks(mask, x_numel),
                order.index(dim % ndim) + 1,
                torch.contiguous_format,
            )
            return _from_memory_order(out, order), 0

        return rule

    lib = torch.library.Library("crelu_ext", "FRAGMENT")
    _LIBRARIES.append(lib)
    _register_batched_kernel(lib, forward, forward_rule, tensor_args=1)
    _register_batched_kernel(lib, backward, masked_rule(backward_op, halves=True), 2)
    _register_batched_kernel(
        lib, backward_backward, masked_rule(backward_backward_op, halves=False), 2
    )
