"""Every autograd mode gives the composition's results bit for bit: forward
mode, torch.func transforms and their compositions, checkpointing, with
special values (NaN, +-0, +-inf, subnormals), on every backend. Reverse
mode at any order is in test_autograd.py, torch.compile in test_compile.py."""

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from helpers import assert_bitwise_equal, make_input
from torch.utils._pytree import tree_flatten

import crelu_ext

SHAPE = (2, 4, 3)  # small: jacobians and hessians have numel^2 entries


def doubled(shape, dim):
    shape = list(shape)
    shape[dim] *= 2
    return shape


@pytest.fixture(params=[torch.float64, torch.float32], ids=str)
def case(request, backend_device):
    backend, device = backend_device
    dtype = request.param

    def make(shape, seed):
        return make_input(shape, dtype, device, seed=seed, special_fraction=0.4)

    return backend, make


def check_modes_agree(mode, backend, dim=1):
    """``mode(f)`` with f the backend's crelu and with the composition."""

    def fused(x):
        return crelu_ext.crelu(x, dim, backend=backend)

    def composition(x):
        return crelu_ext.reference.crelu(x, dim)

    actual, _ = tree_flatten(mode(fused))
    expected, _ = tree_flatten(mode(composition))
    assert len(actual) == len(expected)
    for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
        assert_bitwise_equal(a, e, f"output {i}")


@pytest.mark.parametrize("dim", [1, -1, 0])
def test_forward_ad_dual_tensors(case, dim):
    backend, make = case
    x, t = make(SHAPE, 0), make(SHAPE, 1)

    def mode(f):
        with fwAD.dual_level():
            out = f(fwAD.make_dual(x, t))
            primal, tangent = fwAD.unpack_dual(out)
            assert tangent is not None, "the tangent was lost"
            return primal, tangent

    check_modes_agree(mode, backend, dim)


def test_forward_ad_with_reverse_mode(case):
    # A dual input that also requires grad: the tangent, and gradients through it.
    backend, make = case
    x0, t, g = make(SHAPE, 0), make(SHAPE, 1), make(doubled(SHAPE, 1), 2)

    def mode(f):
        x = x0.clone().requires_grad_(True)
        with fwAD.dual_level():
            out = f(fwAD.make_dual(x, t))
            primal, tangent = fwAD.unpack_dual(out)
            (grad_x,) = torch.autograd.grad(primal, x, g)
            return primal, tangent, grad_x

    check_modes_agree(mode, backend)


def test_func_jvp(case):
    backend, make = case
    x, t = make(SHAPE, 0), make(SHAPE, 1)
    check_modes_agree(lambda f: torch.func.jvp(f, (x,), (t,)), backend)


def test_func_jacfwd_and_jacrev(case):
    backend, make = case
    x = make(SHAPE, 0)
    check_modes_agree(lambda f: torch.func.jacfwd(f)(x), backend)
    check_modes_agree(lambda f: torch.func.jacrev(f)(x), backend)


def test_func_vjp(case):
    backend, make = case
    x, g = make(SHAPE, 0), make(doubled(SHAPE, 1), 1)

    def mode(f):
        out, vjp_fn = torch.func.vjp(f, x)
        return out, vjp_fn(g)

    check_modes_agree(mode, backend)


def weighted(f, w):
    """A scalar function of x whose derivatives of every order go through f's."""
    return lambda x: (f(x).square() * w).sum()


def test_func_grad_and_hessian(case):
    backend, make = case
    x, w = make(SHAPE, 0), make(doubled(SHAPE, 1), 1)
    check_modes_agree(lambda f: torch.func.grad(weighted(f, w))(x), backend)
    # jacfwd(jacrev): tangents pushed through the backward ops.
    check_modes_agree(lambda f: torch.func.hessian(weighted(f, w))(x), backend)
    check_modes_agree(lambda f: torch.func.jacrev(torch.func.jacrev(weighted(f, w)))(x), backend)
    check_modes_agree(lambda f: torch.func.jacrev(torch.func.jacfwd(weighted(f, w)))(x), backend)
    check_modes_agree(lambda f: torch.func.jacfwd(torch.func.jacfwd(weighted(f, w)))(x), backend)


def test_forward_over_reverse_hvp(case):
    backend, make = case
    x, t, w = make(SHAPE, 0), make(SHAPE, 1), make(doubled(SHAPE, 1), 2)
    check_modes_agree(
        lambda f: torch.func.jvp(torch.func.grad(weighted(f, w)), (x,), (t,)), backend
    )


def test_func_vmap_and_per_sample_gradients(case):
    backend, make = case
    batch = make((5, *SHAPE), 0)
    w = make(doubled(SHAPE, 1), 1)
    check_modes_agree(lambda f: torch.func.vmap(f)(batch), backend)
    check_modes_agree(lambda f: torch.func.vmap(f, in_dims=1)(batch), backend)
    check_modes_agree(lambda f: torch.func.vmap(torch.func.grad(weighted(f, w)))(batch), backend)
    check_modes_agree(lambda f: torch.func.vmap(torch.func.jacrev(f))(batch), backend)


def test_activation_checkpointing(case):
    backend, make = case
    x0, g = make(SHAPE, 0), make(doubled(SHAPE, 1), 1)

    def mode(f):
        x = x0.clone().requires_grad_(True)
        out = torch.utils.checkpoint.checkpoint(f, x, use_reentrant=False)
        (grad_x,) = torch.autograd.grad(out, x, g)
        return out, grad_x

    check_modes_agree(mode, backend)


def test_special_values_are_covered():
    # The inputs above hold every special value the rules treat apart.
    x = make_input((2000,), torch.float32, special_fraction=0.4)
    assert torch.isnan(x).any() and torch.isinf(x).any()
    assert (x == 0).logical_and(x.signbit()).any() and (x == 0).logical_and(~x.signbit()).any()
    assert ((x != 0) & (x.abs() < torch.finfo(x.dtype).tiny)).any()  # subnormals
