"""Choosing a backend: the registry, the default ("auto", $CRELU_EXT_BACKEND,
set_default_backend), devices this process has none of, and the warning when
"auto" can only run the reference because the compiled part is missing.

Each test that changes process-wide state runs in a fresh Python."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import crelu_ext


def run_python(code: str, env: dict | None = None) -> dict:
    """Runs ``code`` in a fresh Python; returns the JSON its last line prints."""
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def _environment() -> dict:
    return {k: v for k, v in os.environ.items() if k != "CRELU_EXT_BACKEND"}


def test_a_registered_backend_is_listed_selectable_and_never_auto():
    found = run_python(
        """
        import json, torch, crelu_ext

        def doubled(x, dim):
            return crelu_ext.reference.crelu(x, dim) * 2

        crelu_ext.register_backend("doubled", doubled, lambda device: device.type == "cpu")
        crelu_ext.register_backend("meta_only", doubled, lambda device: device.type == "meta")
        x = torch.tensor([[1.0, -2.0]])
        found = {
            "cpu": crelu_ext.available_backends("cpu"),
            "meta": crelu_ext.available_backends("meta"),
            "chosen": crelu_ext.crelu(x, 1, backend="doubled").tolist(),
            "auto": crelu_ext.crelu(x, 1).tolist(),
            "module": crelu_ext.CReLU(1, backend="doubled")(x).tolist(),
        }
        crelu_ext.register_backend("doubled", crelu_ext.reference.crelu, lambda d: True)
        found["replaced"] = crelu_ext.crelu(x, 1, backend="doubled").tolist()
        try:
            crelu_ext.crelu(x, 1, backend="meta_only")
        except RuntimeError as error:
            found["unavailable"] = str(error)
        for name in ("auto", ""):
            try:
                crelu_ext.register_backend(name, doubled, lambda d: True)
            except ValueError as error:
                found.setdefault("invalid", []).append(str(error))
        print(json.dumps(found))
        """
    )
    builtin = [b for b in crelu_ext.available_backends("cpu") if b in ("native", "triton")]
    assert found["cpu"] == [*builtin, "doubled", "reference"]
    assert found["meta"] == ["meta_only", "reference"]
    assert found["chosen"] == found["module"] == [[2.0, 0.0, 0.0, 4.0]]
    assert found["auto"] == found["replaced"] == [[1.0, 0.0, 0.0, 2.0]]
    assert "backend 'meta_only' is not available for cpu tensors" in found["unavailable"]
    assert len(found["invalid"]) == 2
    assert all("crelu_ext.register_backend: invalid backend name" in e for e in found["invalid"])


def test_tracers_call_the_implementation_and_eager_mode_the_eager_one():
    found = run_python(
        """
        import json, warnings, torch, crelu_ext

        calls = []

        def traced(x, dim):
            calls.append("traced")
            return crelu_ext.reference.crelu(x, dim)

        def eager(x, dim):
            calls.append("eager")
            return crelu_ext.reference.crelu(x, dim)

        crelu_ext.register_backend("two", traced, lambda d: True, eager_implementation=eager)
        x = torch.randn(2, 3)
        crelu_ext.crelu(x, 1, backend="two")
        crelu_ext.CReLU(1, backend="two")(x)
        found = {"eager": calls[:]}
        calls.clear()
        torch.compile(lambda x: crelu_ext.crelu(x, 1, backend="two"), backend="eager")(x)
        found["compile"] = sorted(set(calls))
        calls.clear()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.jit.trace's deprecation
            torch.jit.trace(lambda x: crelu_ext.crelu(x, 1, backend="two"), x, check_trace=False)
        found["jit.trace"] = calls[:]
        print(json.dumps(found))
        """
    )
    assert found == {"eager": ["eager", "eager"], "compile": ["traced"], "jit.trace": ["traced"]}


def test_the_emulator_is_no_backend_users_see():
    found = run_python(
        """
        import json, crelu_ext
        import crelu_ext.testing.emulated as emulated
        imported = crelu_ext.available_backends("cpu")
        registered = emulated.register_backends()
        print(json.dumps({
            "imported": imported,
            "registered": registered,
            "available": emulated.AVAILABLE,
            "after": crelu_ext.available_backends("cpu"),
        }))
        """,
        {k: v for k, v in _environment().items() if k != "TRITON_INTERPRET"},
    )
    assert not {"emulated", "emulated64"} & set(found["imported"])
    # The test suite registers them itself (tests/helpers.py), where the build has them.
    assert found["registered"] == (["emulated", "emulated64"] if found["available"] else [])
    assert found["after"] == [*found["imported"][:-1], *found["registered"], "reference"]


def test_the_environment_variable_is_read_at_import():
    code = """
        import json, os, torch, crelu_ext
        x = torch.randn(2, 3, requires_grad=True)
        before = type(crelu_ext.crelu(x, 1).grad_fn).__name__
        os.environ["CRELU_EXT_BACKEND"] = "fast"  # too late: read at import only
        after = type(crelu_ext.crelu(x, 1).grad_fn).__name__
        previous = crelu_ext.set_default_backend("auto")
        print(json.dumps([before, after, previous]))
        """
    env = {**_environment(), "CRELU_EXT_BACKEND": "reference"}
    assert run_python(code, env) == ["CatBackward0", "CatBackward0", "reference"]


def test_an_unknown_environment_variable_value_is_named_at_the_call():
    code = """
        import json, torch, crelu_ext
        try:
            crelu_ext.crelu(torch.randn(2, 3), 1)
        except ValueError as error:
            print(json.dumps(str(error)))
        """
    message = run_python(code, {**_environment(), "CRELU_EXT_BACKEND": "fast"})
    assert message.startswith("crelu_ext.crelu: unknown CRELU_EXT_BACKEND 'fast'")


# Hides the compiled part as a package without it (a source checkout) would.
WITHOUT_COMPILED_PART = """
import sys

class HideCompiledPart:
    def find_spec(self, name, path=None, target=None):
        if name == "crelu_ext._C":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, HideCompiledPart())
"""


def test_auto_warns_once_when_it_falls_back_to_the_reference():
    found = run_python(
        WITHOUT_COMPILED_PART
        + """
import json, warnings, torch, crelu_ext

crelu_ext.register_backend("doubled", lambda x, dim: 2 * x, lambda device: True)
x = torch.randn(2, 3)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    crelu_ext.crelu(x, 1, backend="reference")
    explicit = len(caught)
    auto = crelu_ext.crelu(x, 1)
    crelu_ext.crelu(x, 0)
    crelu_ext.CReLU()(x)
    crelu_ext.crelu(x.double(), 1)
print(json.dumps({
    "backends": crelu_ext.available_backends("cpu"),
    "explicit": explicit,
    "auto_is_reference": torch.equal(auto, crelu_ext.reference.crelu(x, 1)),
    "warnings": [(w.category.__name__, str(w.message), w.filename) for w in caught],
}))
"""
    )
    assert found["backends"] == ["doubled", "reference"] or "triton" in found["backends"]
    assert found["explicit"] == 0
    if "triton" in found["backends"]:
        pytest.skip("auto runs triton here, not the reference")
    assert found["auto_is_reference"]  # never the registered backend
    ((category, message, filename),) = found["warnings"]
    assert category == "RuntimeWarning"
    assert message.startswith("crelu_ext.crelu: running the reference composition")
    assert "has no compiled part (crelu_ext._C)" in message
    assert filename == "<string>"  # attributed to the caller's line


def test_the_fallback_warning_points_at_the_callers_line():
    # Each call below resolves "auto" afresh with the warning not yet given, so each warns.
    code = (
        WITHOUT_COMPILED_PART
        + """
import json, warnings, torch, crelu_ext

class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.act = crelu_ext.CReLU()

    def forward(self, x):
        return self.act(x)  # net's line

x = torch.randn(2, 3)
found = {}
calls = {
    "function": lambda: crelu_ext.crelu(x, 1),  # function's line
    "module": lambda: crelu_ext.CReLU()(x),  # module's line
    "sequential": lambda: torch.nn.Sequential(crelu_ext.CReLU())(x),  # sequential's line
    "net": lambda: Net()(x),
}
for name, call in calls.items():
    crelu_ext.functional._warned_fallback = False
    crelu_ext.functional._RESOLVED.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        call()
    found[name] = [(w.filename, w.lineno) for w in caught if w.category is RuntimeWarning]
print(json.dumps(found))
"""
    )
    # Without Triton's interpreter, which would make "auto" run triton on the CPU.
    found = run_python(code, {k: v for k, v in _environment().items() if k != "TRITON_INTERPRET"})
    lines = code.splitlines()
    for name, where in found.items():
        (line,) = [i for i, text in enumerate(lines, 1) if text.endswith(f"# {name}'s line")]
        assert where == [["<string>", line]], name


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_no_backend_is_claimed_for_cuda_without_cuda():
    assert crelu_ext.available_backends("cuda") == []
    assert crelu_ext.available_backends("cuda:0") == []
    for backend in ("auto", "native", "reference"):
        with pytest.raises(RuntimeError, match=r"no backend runs cuda tensors: this process has"):
            crelu_ext.functional.select_backend(backend, torch.device("cuda"))


def test_available_backends_of_devices_that_exist():
    assert crelu_ext.available_backends()[-1] == "reference"
    assert crelu_ext.available_backends("cpu") == crelu_ext.available_backends(torch.device("cpu"))
    assert crelu_ext.available_backends("meta")[-1] == "reference"
    if torch.cuda.is_available():
        assert crelu_ext.available_backends("cuda")[-1] == "reference"


def test_set_default_backend_checks_the_name():
    with pytest.raises(ValueError, match=r"crelu_ext\.crelu: unknown backend 'cuda'"):
        crelu_ext.set_default_backend("cuda")
    assert crelu_ext.set_default_backend("auto") == "auto"  # the failed call changed nothing
