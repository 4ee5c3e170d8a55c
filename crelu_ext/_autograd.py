"""Autograd for the backends whose ops are defined in Python (Triton, the
emulated CUDA kernels), in every mode; the native ops have theirs in C++
(csrc/autograd.cpp), with the same formulas.

Forward ``crelu(x, dim, save_mask) -> (out, mask)`` saves only the packed 2-bit
mask. The backward is linear in the incoming gradient, and ``crelu_backward``
and ``crelu_backward_backward`` are each other's adjoints, so each one's
backward is the other: every order of derivative works. Each op's tangent
(forward mode) is the one autograd computes through the composition
``cat([relu(x), relu(-x)], dim)``, bit for bit.

A backend registers its three ops with :func:`register_crelu_autograd` and runs
its forward with :func:`call_forward`.
"""

import torch
from torch.autograd import forward_ad

from ._checks import check_input
from ._layout import output_memory_format

# Forward op (packet and default overload) -> its autograd.Function.
_FUNCTIONS: dict = {}


def crelu_tangent(x_t: torch.Tensor, out: torch.Tensor, dim: int) -> torch.Tensor:
    """The composition's tangent: cat's of relu's, ``threshold_backward(t, relu(x), 0)``,
    and of relu(-x)'s, ``threshold_backward(-t, relu(-x), 0)``; that is
    ``(pos ? t : +0, neg ? -t : +0)``, with -0 kept where t is -0."""
    relu_x, relu_neg_x = out.chunk(2, dim)
    threshold_backward = torch.ops.aten.threshold_backward
    return torch.cat(
        [threshold_backward(x_t, relu_x, 0), threshold_backward(-x_t, relu_neg_x, 0)], dim
    )


def call_forward(forward_op, x: torch.Tensor, dim: int) -> torch.Tensor:
    """Runs a backend's forward op, writing the mask only when autograd will need
    it. Under forward mode or a torch.func transform it goes through the op's
    autograd.Function, which has their rules; otherwise (and under torch.compile,
    which traces the op) the op's own reverse-mode autograd serves."""
    check_input(x, dim)  # errors named after crelu_ext.crelu, not the backend's op
    # Private reads: torch has no public test for an active forward-AD level or
    # torch.func transform, and always taking the autograd.Function costs ~90 us
    # more per call than this ~1 us test (measured).
    if torch.compiler.is_compiling() or (
        forward_ad._current_level < 0 and torch._C._functorch.maybe_current_level() is None
    ):
        return forward_op(x, dim, torch.is_grad_enabled() and x.requires_grad)[0]
    return _FUNCTIONS[forward_op].apply(x, dim)[0]


def register_crelu_autograd(forward: str, backward: str, backward_backward: str) -> None:
    """Registers autograd for the ops ``crelu_ext::<forward>``, ``<backward>``
    and ``<backward_backward>``: reverse mode on the ops themselves, and every
    mode (forward mode and torch.func transforms too) for :func:`call_forward`."""
    ops = torch.ops.crelu_ext
    forward_op = getattr(ops, forward).default
    backward_op = getattr(ops, backward).default
    backward_backward_op = getattr(ops, backward_backward).default

    class CReLUFunction(torch.autograd.Function):
        generate_vmap_rule = True

        @staticmethod
        def forward(x, dim):
            return forward_op(x, dim, True)

        @staticmethod
        def setup_context(ctx, inputs, output):
            x, dim = inputs
            out, mask = output
            ctx.dim = dim
            ctx.memory_format = output_memory_format(x)
            ctx.save_for_backward(mask)
            ctx.save_for_forward(out)
            ctx.mark_non_differentiable(mask)

        @staticmethod
        def backward(ctx, grad_out, _grad_mask):
            (mask,) = ctx.saved_tensors
            return CReLUBackward.apply(grad_out, mask, ctx.dim, ctx.memory_format), None

        @staticmethod
        def jvp(ctx, x_t, _dim_t):
            (out,) = ctx.saved_tensors
            return crelu_tangent(x_t, out, ctx.dim), None

    def masked_function(op, adjoint, tangent_input):
        """crelu_backward and crelu_backward_backward: linear in ``grad``; the
        backward is the adjoint op, the tangent the op itself after
        ``tangent_input``."""

        class Masked(torch.autograd.Function):
            generate_vmap_rule = True

            @staticmethod
            def forward(grad, mask, dim, memory_format):
                return op(grad, mask, dim, memory_format)

            @staticmethod
            def setup_context(ctx, inputs, output):
                _, mask, ctx.dim, ctx.memory_format = inputs
                ctx.save_for_backward(mask)
                ctx.save_for_forward(mask)

            @staticmethod
            def backward(ctx, grad):
                (mask,) = ctx.saved_tensors
                return adjoint().apply(grad, mask, ctx.dim, ctx.memory_format), None, None, None

            @staticmethod
            def jvp(ctx, grad_t, *_):
                (mask,) = ctx.saved_tensors
                return Masked.apply(tangent_input(grad_t), mask, ctx.dim, ctx.memory_format)

        return Masked

    # The composition's backward computes threshold_backward(g, relu(x), 0), whose
    # tangent autograd forms as zeros_like(relu(x)'s tangent) + threshold_backward(g_t,
    # ...): the "+ 0" turns -0 into +0.
    CReLUBackward = masked_function(backward_op, lambda: CReLUBackwardBackward, lambda t: t + 0)
    CReLUBackwardBackward = masked_function(
        backward_backward_op, lambda: CReLUBackward, lambda t: t
    )
    _FUNCTIONS[forward_op] = _FUNCTIONS[getattr(ops, forward)] = CReLUFunction

    # Reverse mode on the ops themselves (direct calls, torch.library.opcheck).
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
        return CReLUBackward.apply(grad_out, mask, ctx.dim, ctx.memory_format), None, None

    def setup_masked(ctx, inputs, output):
        _, mask, ctx.dim, ctx.memory_format = inputs
        ctx.save_for_backward(mask)

    def backward_of(adjoint):
        def backward(ctx, grad):
            (mask,) = ctx.saved_tensors
            return adjoint.apply(grad, mask, ctx.dim, ctx.memory_format), None, None, None

        return backward

    torch.library.register_autograd(forward_op, forward_backward, setup_context=setup_forward)
    torch.library.register_autograd(
        backward_op, backward_of(CReLUBackwardBackward), setup_context=setup_masked
    )
    torch.library.register_autograd(
        backward_backward_op, backward_of(CReLUBackward), setup_context=setup_masked
    )
