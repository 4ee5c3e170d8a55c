"""Hypothesis properties: the two halves recombine exactly,
relu(x) - relu(-x) == x and relu(x) + relu(-x) == |x|, bit for bit."""

import numpy as np
import pytest
import torch
from helpers import assert_bitwise_equal, backend_devices
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import array_shapes, arrays

import crelu_ext

NUMPY_DTYPES = {torch.float16: np.float16, torch.float32: np.float32, torch.float64: np.float64}


@st.composite
def tensors_and_dims(draw):
    dtype = draw(st.sampled_from(list(NUMPY_DTYPES)))
    values = draw(
        arrays(
            NUMPY_DTYPES[dtype],
            array_shapes(min_dims=1, max_dims=4, min_side=1, max_side=9),
            elements=st.floats(width=torch.finfo(dtype).bits, allow_subnormal=True),
        )
    )
    x = torch.from_numpy(values)
    return x, draw(st.integers(-x.dim(), x.dim() - 1))


# Not in Triton's interpreter, where each example takes seconds.
@pytest.mark.parametrize(
    "backend_device", backend_devices(include=lambda b, d: (b, d) != ("triton", "cpu"))
)
@settings(max_examples=150, deadline=None)
@given(case=tensors_and_dims())
def test_halves_recombine_exactly(backend_device, case):
    backend, device = backend_device
    x, dim = case
    x = x.to(device)
    pos, neg = crelu_ext.crelu(x, dim, backend=backend).chunk(2, dim)
    assert_bitwise_equal(pos - neg, x, "pos - neg")
    assert_bitwise_equal(pos + neg, x.abs(), "pos + neg")
    assert bool((pos >= 0).logical_or(pos.isnan()).all())
    assert bool((neg >= 0).logical_or(neg.isnan()).all())
