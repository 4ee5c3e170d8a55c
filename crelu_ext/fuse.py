"""``crelu_ext.fuse(model)``: the CReLU idioms a model writes by hand, replaced
in place by the fused op in each module's own forward; ``backend="crelu_ext"``
for ``torch.compile``, the same rewrite in the graphs Dynamo captures.
docs/fuse.md tells the whole story.

``fuse`` rewrites each forward's source (crelu_ext/_rewrite.py): the idiom's
text is replaced by a call that checks, at each call, that the idiom's parts
are still torch's and runs the fused op, or the idiom as written; everything
else in the forward stays the user's Python. The rewritten function is the
instance's ``forward``, a method bound to it, with companions in the
instance's ``__dict__``: the record of what was there before
(``__crelu_ext_fuse__``), ``__prepare_scriptable__`` (``torch.jit.script``
checks the idioms again and scripts the rewritten text, which holds
``fused_crelu`` for TorchScript), ``__jit_ignored_attributes__`` (a name of
the rewrite's own, which keeps TorchScript from sharing a compiled type
between fused and unfused instances of a class) and ``__reduce_ex__``
(``torch.save``, ``copy.deepcopy``: the module is saved without its rewritten
forward, and rewritten again from its class's source when loaded).
"""

import importlib.metadata
import operator
import sys
import types
import warnings
from typing import Any, NamedTuple

import torch
import torch.fx
import torch.nn.functional as F

from . import _rewrite
from ._rewrite import fused_crelu

_CATS = {torch.cat, torch.concat, torch.concatenate}
_NEGATIONS = {operator.neg, torch.neg, torch.negative}
_NEGATION_METHODS = {"neg", "negative"}
_MULTIPLICATIONS = {operator.mul, torch.mul}
_IN_PLACE_OPERATORS = {
    operator.setitem, operator.iadd, operator.isub, operator.imul, operator.itruediv,
    operator.ifloordiv, operator.imod, operator.ipow, operator.iand, operator.ior,
    operator.ixor, operator.ilshift, operator.irshift, operator.imatmul,
}  # fmt: skip


def _relu_input(node: torch.fx.Node, modules) -> tuple[torch.fx.Node, bool] | None:
    """``(input, in_place)`` when ``node`` is a ReLU."""
    if node.op == "call_function" and node.target in (torch.relu, torch.relu_, F.relu_):
        if len(node.args) == 1 and not node.kwargs:
            return node.args[0], node.target is not torch.relu
    elif node.op == "call_function" and node.target is F.relu:
        arguments = dict(zip(("input", "inplace"), node.args, strict=False)) | node.kwargs
        if set(arguments) <= {"input", "inplace"} and "input" in arguments:
            in_place = arguments.get("inplace", False)
            if isinstance(in_place, bool):
                return arguments["input"], in_place
    elif node.op == "call_method" and node.target in ("relu", "relu_"):
        if len(node.args) == 1 and not node.kwargs:
            return node.args[0], node.target == "relu_"
    elif (
        node.op == "call_module"
        and type(modules[node.target]) is torch.nn.ReLU
        and len(node.args) == 1
        and not node.kwargs
    ):
        return node.args[0], modules[node.target].inplace
    return None


def _is_minus_one(value) -> bool:
    return type(value) in (int, float) and value == -1


def _negated(node) -> torch.fx.Node | None:
    """``x`` when ``node`` computes ``-x`` exactly (not in place)."""
    if not isinstance(node, torch.fx.Node) or node.kwargs:
        return None
    args = node.args
    if len(args) == 1 and (
        (node.op == "call_function" and node.target in _NEGATIONS)
        or (node.op == "call_method" and node.target in _NEGATION_METHODS)
    ):
        return args[0]
    is_product = (node.op == "call_function" and node.target in _MULTIPLICATIONS) or (
        node.op == "call_method" and node.target == "mul"
    )
    if is_product and len(args) == 2:
        if _is_minus_one(args[1]) and isinstance(args[0], torch.fx.Node):
            return args[0]
        if node.op == "call_function" and _is_minus_one(args[0]):
            return args[1]
    return None


def _cat_arguments(node: torch.fx.Node) -> tuple[list, int] | None:
    """``(tensors, dim)`` of a concatenation along a constant dim."""
    if node.op != "call_function" or node.target not in _CATS or not node.args:
        return None
    if len(node.args) > 2 or set(node.kwargs) - {"dim", "axis"}:
        return None
    if len(node.args) == 2:
        dim = node.args[1]
    else:
        dim = node.kwargs.get("dim", node.kwargs.get("axis", 0))
    tensors = node.args[0]
    if type(dim) is not int or not isinstance(tensors, (list, tuple)):
        return None
    return list(tensors), dim


def _may_write_in_place(node: torch.fx.Node, modules) -> bool:
    if node.op == "call_method":
        return node.target.endswith("_") and not node.target.endswith("__")
    if node.op == "call_function":
        if node.target in _IN_PLACE_OPERATORS or "out" in node.kwargs:
            return True
        if node.kwargs.get("inplace") is True or any(arg is True for arg in node.args[1:]):
            return True
        return getattr(node.target, "__name__", "").endswith("_")
    if node.op == "call_module":
        module = modules[node.target]
        return getattr(module, "inplace", False) or not type(module).__module__.startswith(
            ("torch.nn.", "crelu_ext.")
        )
    return False


class _Fuser:
    def __init__(self, graph: torch.fx.Graph, modules: dict[str, torch.nn.Module]) -> None:
        self.graph = graph
        self.modules = modules
        self.position = {}

    def number_nodes(self) -> None:
        self.position = {node: i for i, node in enumerate(self.graph.nodes)}

    def only_used_by(self, node: torch.fx.Node, user: torch.fx.Node) -> bool:
        return list(node.users) == [user]

    def nothing_writes_between(self, steps: list[torch.fx.Node]) -> bool:
        first = min(self.position[s] for s in steps)
        last = max(self.position[s] for s in steps)
        between = [n for n in self.graph.nodes if first < self.position[n] < last]
        return not any(n not in steps and _may_write_in_place(n, self.modules) for n in between)

    def match_cat_of_relus(self, cat: torch.fx.Node):
        """``cat([relu(x), relu(-x)], d)`` -> ``(x, d, [steps])``."""
        arguments = _cat_arguments(cat)
        if arguments is None or len(arguments[0]) != 2:
            return None
        (positive, negative), dim = arguments
        if not (isinstance(positive, torch.fx.Node) and isinstance(negative, torch.fx.Node)):
            return None
        relu_positive = _relu_input(positive, self.modules)
        relu_negative = _relu_input(negative, self.modules)
        if relu_positive is None or relu_negative is None or relu_positive[1]:
            return None  # relu_(x) would change x for everything after it
        x, negation = relu_positive[0], relu_negative[0]
        if _negated(negation) is not x or x is negation:
            return None
        steps = [positive, negative, negation, cat]
        chain = [(positive, cat), (negative, cat), (negation, negative)]
        if not all(self.only_used_by(a, b) for a, b in chain):
            return None
        return x, dim, steps, [cat]

    def match_relu_of_cat(self, relu: torch.fx.Node):
        """``relu(cat([x, -x], d))`` -> ``(x, d, [steps])``."""
        relu_input = _relu_input(relu, self.modules)
        if relu_input is None or not isinstance(relu_input[0], torch.fx.Node):
            return None
        cat, in_place = relu_input
        arguments = _cat_arguments(cat)
        if arguments is None or len(arguments[0]) != 2:
            return None
        (x, negation), dim = arguments
        if not isinstance(x, torch.fx.Node) or _negated(negation) is not x:
            return None
        if not self.only_used_by(negation, cat):
            return None
        # relu_ writes its result into the concatenation: uses of it after the
        # relu_ see the same values as the relu_'s own uses.
        later_uses = [u for u in cat.users if u is not relu]
        if not in_place and later_uses:
            return None
        if any(self.position[u] < self.position[relu] for u in later_uses):
            return None
        return x, dim, [negation, cat, relu], [cat, relu]

    def fuse(self) -> list[str]:
        fused = []
        for node in list(self.graph.nodes):
            if node.graph is not self.graph:
                continue  # erased by an earlier rewrite
            self.number_nodes()
            match = self.match_cat_of_relus(node) or self.match_relu_of_cat(node)
            if match is None:
                continue
            x, dim, steps, outputs = match
            if not self.nothing_writes_between(steps):
                continue
            concatenation = next(s for s in steps if s.target in _CATS)
            with self.graph.inserting_before(concatenation):
                replacement = self.graph.call_function(fused_crelu, (x, dim))
            for output in outputs:
                output.replace_all_uses_with(replacement)
            for step in reversed(sorted(steps, key=self.position.__getitem__)):
                self.graph.erase_node(step)
            fused.append(node.name)
        return fused


# What graphs torch.fx or Dynamo capture call for a replaced idiom.
torch.fx.wrap("fused_crelu")


class Skipped(NamedTuple):
    """An idiom that ``fuse`` left as written (``model.fuse_skipped``)."""

    module: str  # its module's qualified name in the model ("" for the model itself)
    function: str  # the function that writes it (``__qualname__``)
    line: int | None  # its line in that function's file, where known
    idiom: str  # its source, where known
    reason: str


class FuseWarning(UserWarning):
    """What ``crelu_ext.fuse`` warns of: the idioms it left as written."""


class _Ignored(list):
    """The names TorchScript ignores on a fused instance (fuse's own list)."""


class _Fused(NamedTuple):
    """A fused instance's record: the instance-level forward it had before
    (None: its class's), and whether its forward runs inside recompute()."""

    original: Any
    recompute: bool


_RECORD = "__crelu_ext_fuse__"
_IGNORED = "__jit_ignored_attributes__"
_COMPANIONS = (_RECORD, "__prepare_scriptable__", "__reduce_ex__", _IGNORED)


def fuse(model: torch.nn.Module, recompute: bool = False) -> torch.nn.Module:
    """Replaces, in place, each hand-written CReLU in the forwards of ``model``
    and its submodules (``cat([relu(x), relu(-x)], d)``, ``relu(cat([x, -x], d))``
    and their variants: docs/fuse.md) by the fused op, and returns ``model``.

    Each module whose forward (or a function it calls) writes an idiom gets a
    forward of its own: its class's (or its instance-level) forward with the
    idiom's text replaced and nothing else, so every other line keeps its
    Python meaning at each call. The replacement checks at each call that the
    idiom's callables are still torch's (``type(m) is nn.ReLU`` without hooks
    for a module), its in-place flags, that the dim is an int and the dtype
    one the op takes, and otherwise runs the idiom as written. The model keeps
    its class, parameters, state_dict keys and other methods.

    ``model.fused`` lists what was replaced, ``"qualified.name: idiom"``;
    ``model.fuse_skipped`` lists, as :class:`Skipped` records, the idioms left
    as written and why (no source to read, a decorated forward, an operand
    that is not a plain name...), and one :class:`FuseWarning` names them.
    Fusing again gives the same result.

    ``recompute=True`` runs ``model``'s forward inside
    :func:`crelu_ext.recompute` (eagerly only): the layer after each CReLU
    keeps CReLU's input, not its twice-as-large output.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"crelu_ext.fuse: expected a torch.nn.Module, got {type(model).__name__}")
    fused, skipped = [], []
    for name, module in model.named_modules():
        outcome, function = _fuse_module(module, recompute and module is model)
        fused += [f"{name}: {what}" if name else what for what in outcome.fused]
        skipped += [
            Skipped(name, left.function, left.line, left.idiom, left.reason)
            for left in outcome.left
        ]
        if recompute and module is model and outcome.function is None:
            reason = outcome.reason or "the model has no forward of its own"
            skipped.append(
                Skipped(name, function, None, "", f"recompute=True not applied: {reason}")
            )
    model.fused = fused
    model.fuse_skipped = skipped
    if skipped:
        warnings.warn(_warning(skipped), FuseWarning, stacklevel=2)
    return model


def _warning(skipped: list) -> str:
    lines = [
        f"crelu_ext.fuse left {len(skipped)} CReLU idiom{'s' if len(skipped) > 1 else ''} "
        "as written (model.fuse_skipped lists them):"
    ]
    for entry in skipped:
        where = entry.function + (f", line {entry.line}" if entry.line else "")
        idiom = f" {entry.idiom}:" if entry.idiom else ""
        lines.append(f"  {entry.module or 'the model'} ({where}):{idiom} {entry.reason}")
    return "\n".join(lines)


def _forward_of(module: torch.nn.Module):
    """``(function, its self or None, whether it is torch's own code)`` for the
    forward ``module`` runs, or None when that is not a Python function."""
    forward = module.__dict__.get("forward")
    if forward is None:  # the class's: for a parametrized module, the user's class's
        for klass in type(module).__mro__:
            if "forward" in vars(klass):
                function = vars(klass)["forward"]
                break
        else:
            return None
        if not isinstance(function, types.FunctionType) or function is torch.nn.Module.forward:
            return None
        library = klass.__module__.partition(".")[0] in ("torch", "crelu_ext")
        return function, module, library
    if isinstance(forward, types.MethodType) and isinstance(forward.__func__, types.FunctionType):
        return forward.__func__, forward.__self__, False
    if isinstance(forward, types.FunctionType):
        return forward, None, False
    return None


def _fuse_module(module: torch.nn.Module, recompute: bool):
    """Gives ``module`` its rewritten forward, if it has one; returns the
    rewrite and the name of the function rewritten."""
    _unfuse(module)
    found = None if isinstance(module, torch.jit.ScriptModule) else _forward_of(module)
    if found is None:
        reason = "its forward is not a Python function"
        return _rewrite.Rewrite(None, reason=reason), type(module).__qualname__ + ".forward"
    function, instance, library = found
    outcome = _rewrite.rewrite(function, instance, recompute=recompute, scan=not library)
    if outcome.function is not None:
        state = module.__dict__
        original = state.get("forward")
        rewritten = outcome.function
        state["forward"] = rewritten if instance is None else types.MethodType(rewritten, instance)
        state[_RECORD] = _Fused(original, recompute)
        state["__prepare_scriptable__"] = types.MethodType(_prepare_scriptable, module)
        state["__reduce_ex__"] = types.MethodType(_reduce_ex, module)
        if _IGNORED not in state:
            # TorchScript compiles a class once per set of attributes and reuses
            # it for instances that have the same: a name of this rewrite's own
            # among those it ignores keeps a fused instance from getting the
            # class's unfused code (or another rewrite's), and the other way round.
            ignored = getattr(type(module), _IGNORED, [])
            state[_IGNORED] = _Ignored([*ignored, rewritten.__code__.co_filename])
    return outcome, function.__qualname__


def _unfuse(module: torch.nn.Module) -> None:
    """Puts back the forward ``module`` had before ``fuse`` (a forward set on
    the instance since stays)."""
    state = module.__dict__
    record = state.get(_RECORD)
    if record is None:
        return
    for name in _COMPANIONS:
        if name != _IGNORED or type(state.get(name)) is _Ignored:
            state.pop(name, None)
    if _rewrite.is_rewritten(state.get("forward")):
        if record.original is None:
            del state["forward"]
        else:
            state["forward"] = record.original


def _prepare_scriptable(module: torch.nn.Module) -> torch.nn.Module:
    # torch.jit.script calls this on each module before it compiles any: the
    # idioms are checked again as they are now, and the text is made readable.
    record = module.__dict__.get(_RECORD)
    _fuse_module(module, record is not None and record.recompute)
    _rewrite.register_texts()
    return module


def _reduce_ex(module: torch.nn.Module, protocol: int):
    # Pickled as the class pickles it, without the rewritten forward and its
    # companions; _restore rewrites the forward again once the state is back.
    reduced = type(module).__reduce_ex__(module, protocol)
    if isinstance(reduced, str) or len(reduced) < 3:
        return reduced
    function, arguments, state, *rest = reduced
    fields = state[0] if isinstance(state, tuple) else state
    if not isinstance(fields, dict):
        return reduced
    kept = {
        name: value
        for name, value in fields.items()
        if name not in _COMPANIONS[1:] or (name == _IGNORED and type(value) is not _Ignored)
    }
    if _rewrite.is_rewritten(kept.get("forward")):
        del kept["forward"]
    state = (kept, *state[1:]) if isinstance(state, tuple) else kept
    return (_restore, (function, arguments), state, *rest)


def _restore(function, arguments):
    module = function(*arguments)
    # pickle and copy call an instance's own __setstate__ first.
    module.__dict__["__setstate__"] = types.MethodType(_setstate, module)
    return module


def _setstate(module: torch.nn.Module, state) -> None:
    del module.__dict__["__setstate__"]
    fields = dict(state[0] if isinstance(state, tuple) else state)
    record = fields.pop(_RECORD, None)
    state = (fields, *state[1:]) if isinstance(state, tuple) else fields
    setstate = getattr(type(module), "__setstate__", None)
    if setstate is not None:
        setstate(module, state)
    else:
        module.__dict__.update(fields)
    if record is None:
        return
    if record.original is not None:
        module.__dict__["forward"] = record.original
    outcome, function = _fuse_module(module, record.recompute)
    if outcome.function is None:
        warnings.warn(
            f"crelu_ext.fuse: a {type(module).__qualname__} was loaded with its forward as "
            f"written ({function}): {outcome.reason or 'its idioms no longer hold'}",
            FuseWarning,
            stacklevel=2,
        )


def dynamo_backend(graph_module: torch.fx.GraphModule, example_inputs):
    """``torch.compile(model, backend="crelu_ext")``: each graph Dynamo
    captures, its CReLU idioms replaced by the fused op, compiled by Inductor.
    Dynamo traces bytecode, so this rewrites idioms that ``fuse`` leaves as
    written (no source to read, a decorated forward) and idioms split across
    modules, wherever one graph holds the whole idiom."""
    from torch._inductor.compile_fx import compile_fx  # what backend="inductor" runs

    rewrite(graph_module)
    return compile_fx(graph_module, example_inputs)


def rewrite(graph_module: torch.fx.GraphModule) -> list[str]:
    """Replaces the CReLU idioms in ``graph_module``'s graph; returns the names
    of the nodes replaced."""
    replaced = _Fuser(graph_module.graph, dict(graph_module.named_modules())).fuse()
    if replaced:
        graph_module.graph.lint()
        graph_module.recompile()
    return replaced


def _register_dynamo_backend() -> None:
    # Installed, the package's entry point names the backend, and Dynamo loads
    # it when asked for it. From a source tree it is registered here, when
    # torch._dynamo is loaded already (importing it would load torch.onnx).
    if "torch._dynamo" not in sys.modules:
        return
    if "crelu_ext" not in importlib.metadata.entry_points(group="torch_dynamo_backends").names:
        torch._dynamo.register_backend(dynamo_backend, name="crelu_ext")


_register_dynamo_backend()
