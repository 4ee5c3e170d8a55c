"""The private torch APIs crelu_ext uses, each checked for what the package relies on,
so that a torch release that changes one fails here, by name, rather than somewhere
deep in the suite. docs/development.md lists them with the reason each one pays."""

import pytest
import torch


def changed(api: str, user: str) -> str:
    return (
        f"torch {torch.__version__} changed {api}, which {user} relies on: see "
        "'Private torch APIs' in docs/development.md for what it does there and the "
        "public alternative's measured cost"
    )


def test_functorch_batched_tensor_calls():
    # crelu_ext/_vmap.py: the batching rules' own FuncTorchBatched kernel.
    functorch = torch._C._functorch
    names = ("maybe_current_level", "_unwrap_batched", "_add_batch_dim")
    missing = [name for name in names if not hasattr(functorch, name)]
    assert not missing, changed(f"torch._C._functorch.{missing}", "crelu_ext/_vmap.py")
    seen = []

    def probe(x):
        level = functorch.maybe_current_level()
        tensor, in_dim = functorch._unwrap_batched(x, level)
        seen.append((tuple(tensor.shape), in_dim))
        return functorch._add_batch_dim(tensor.sum(in_dim), 0, level)

    out = torch.vmap(probe)(torch.ones(3, 2))
    assert seen == [((3, 2), 0)] and torch.equal(out, torch.full((2,), 3.0)), changed(
        "unwrapping and wrapping a batched tensor", "crelu_ext/_vmap.py"
    )
    key = torch._C.DispatchKey.FuncTorchBatched
    with torch._C._ExcludeDispatchKeyGuard(torch._C.DispatchKeySet(key)):
        pass


def test_forward_ad_and_functorch_levels():
    # crelu_ext/_autograd.py: is a forward-AD level or a torch.func transform active?
    from torch.autograd import forward_ad

    message = changed("forward_ad._current_level", "crelu_ext/_autograd.py")
    assert forward_ad._current_level == -1, message
    with forward_ad.dual_level():
        assert forward_ad._current_level >= 0, message
    assert torch._C._functorch.maybe_current_level() is None
    levels = []
    torch.func.grad(lambda x: levels.append(torch._C._functorch.maybe_current_level()) or x)(
        torch.tensor(1.0)
    )
    assert levels and levels[0] is not None, changed(
        "torch._C._functorch.maybe_current_level", "crelu_ext/_autograd.py"
    )


def test_top_saved_tensors_default_hooks():
    # crelu_ext/recompute.py chains to the saved-tensor hooks opened before it.
    def pack(t):
        return t

    def unpack(t):
        return t

    top = torch._C._autograd._top_saved_tensors_default_hooks
    assert top(False) is None, changed("_top_saved_tensors_default_hooks", "recompute.py")
    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        assert top(False) == (pack, unpack), changed(
            "torch._C._autograd._top_saved_tensors_default_hooks", "crelu_ext/recompute.py"
        )


def test_dispatch_has_kernel_for_dispatch_key():
    # crelu_ext/_native.py: which devices the compiled library has kernels for.
    has_kernel = torch._C._dispatch_has_kernel_for_dispatch_key
    message = changed("torch._C._dispatch_has_kernel_for_dispatch_key", "crelu_ext/_native.py")
    library = torch.library.Library("crelu_ext_private_api_probe", "DEF")
    library.define("probe(Tensor x) -> Tensor")
    library.impl("probe", torch.clone, "CPU")
    assert has_kernel("crelu_ext_private_api_probe::probe", "CPU"), message
    assert not has_kernel("crelu_ext_private_api_probe::probe", "CUDA"), message


def test_prims_common_dense_check():
    # crelu_ext/_layout.py: "non-overlapping and dense" without guards on symbolic sizes.
    try:
        from torch._prims_common import is_non_overlapping_and_dense_or_false as is_dense
    except ImportError:  # torch before 2.13
        from torch._prims_common import is_non_overlapping_and_dense as is_dense
    message = changed("torch._prims_common's dense check", "crelu_ext/_layout.py")
    assert is_dense(torch.empty(2, 3).t()), message
    assert not is_dense(torch.empty(4, 4)[:, ::2]), message


def test_fake_tensor_test():
    # crelu_ext/triton/ops.py: no alignment check on fake tensors.
    from torch._subclasses.fake_tensor import FakeTensorMode, is_fake

    message = changed("torch._subclasses.fake_tensor.is_fake", "crelu_ext/triton/ops.py")
    assert not is_fake(torch.empty(2)), message
    with FakeTensorMode():
        assert is_fake(torch.empty(2)), message


@pytest.mark.parametrize(
    ("module", "name", "user"),
    [
        ("torch._inductor.compile_fx", "compile_fx", "crelu_ext/fuse.py (backend='crelu_ext')"),
        ("torch._dynamo", "register_backend", "crelu_ext/fuse.py"),
    ],
)
def test_compiler_entry_points(module, name, user):
    import importlib

    assert callable(getattr(importlib.import_module(module), name, None)), changed(
        f"{module}.{name}", user
    )
