"""Autograd for a backend's three ops, registered the same way for each backend.

Forward ``crelu(x, dim, save_mask) -> (out, mask)`` saves only the packed 2-bit
mask. The backward is linear in the incoming gradient, and ``crelu_backward``
and ``crelu_backward_backward`` are each other's adjoints, so each one's
backward is the other: every order of derivative works.
"""

import torch

from ._layout import output_memory_format


def call_forward(forward_op, x: torch.Tensor, dim: int) -> torch.Tensor:
    """Runs a backend's forward op, writing the mask only when autograd will need it."""
    out, _ = forward_op(x, dim, torch.is_grad_enabled() and x.requires_grad)
    return out


def register_crelu_autograd(forward: str, backward: str, backward_backward: str) -> None:
    """Registers autograd on the ops ``crelu_ext::<forward>`` and so on."""
    ops = torch.ops.crelu_ext
    backward_op = getattr(ops, backward)
    backward_backward_op = getattr(ops, backward_backward)

    def setup_forward(ctx, inputs, output):
        x, dim, save_mask = inputs
        _, mask = output
        ctx.dim = dim
        ctx.memory_format = output_memory_format(x)
        ctx.save_mask = save_mask
        ctx.save_for_backward(mask)
        ctx.mark_non_differentiable(mask)

    def forward_backward(ctx, grad_out, _grad_mask):
        if not ctx.save_mask:
            raise RuntimeError(
                f"crelu_ext.{forward}: cannot differentiate a call made with save_mask=False; "
                "call it with save_mask=True when the input requires grad"
            )
        (mask,) = ctx.saved_tensors
        return backward_op(grad_out, mask, ctx.dim, ctx.memory_format), None, None

    def setup_masked(ctx, inputs, output):
        _, mask, dim, memory_format = inputs
        ctx.dim = dim
        ctx.memory_format = memory_format
        ctx.save_for_backward(mask)

    def backward_of(adjoint):
        def backward(ctx, grad):
            (mask,) = ctx.saved_tensors
            return adjoint(grad, mask, ctx.dim, ctx.memory_format), None, None, None

        return backward

    torch.library.register_autograd(
        f"crelu_ext::{forward}", forward_backward, setup_context=setup_forward
    )
    torch.library.register_autograd(
        f"crelu_ext::{backward}", backward_of(backward_backward_op), setup_context=setup_masked
    )
    torch.library.register_autograd(
        f"crelu_ext::{backward_backward}", backward_of(backward_op), setup_context=setup_masked
    )
