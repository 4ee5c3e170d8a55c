"""``crelu_ext.fuse(model)``: the CReLU idioms a model writes by hand, rewritten
in place to the fused op; ``backend="crelu_ext"`` for ``torch.compile``, the
same rewrite in the graphs Dynamo captures. docs/fuse.md tells the whole story.

Recognised, with ``d`` any int dim (positive, negative or by keyword), ReLU as
``torch.relu``, ``F.relu``, ``.relu()``, ``nn.ReLU`` (in-place or not) and the
negation as ``-x``, ``torch.neg``, ``.neg()`` or a multiplication by -1:

- ``cat([relu(x), relu(-x)], d)``
- ``relu(cat([x, -x], d))`` and ``cat([x, -x], d).relu()``

An idiom is rewritten only when that cannot change what the model computes:
its intermediate results have no other use (a ``relu_`` on the concatenation
may have later uses, which see the same values), nothing between its first
and last step may write to a tensor in place, and ``relu_`` is not applied to
``x`` itself. Everything else, including ``cat([a, b])`` of unrelated
tensors, is left alone.
"""

import importlib.metadata
import itertools
import linecache
import math
import operator
import sys
import types

import torch
import torch.fx
import torch.nn.functional as F

from ._checks import FLOAT_DTYPES
from .functional import crelu
from .nn import CReLU
from .recompute import recompute as recompute_saved
from .recompute import track

_CATS = {torch.cat, torch.concat, torch.concatenate}
_NEGATIONS = {operator.neg, torch.neg, torch.negative}
_NEGATION_METHODS = {"neg", "negative"}
_MULTIPLICATIONS = {operator.mul, torch.mul}
_IN_PLACE_OPERATORS = {
    operator.setitem, operator.iadd, operator.isub, operator.imul, operator.itruediv,
    operator.ifloordiv, operator.imod, operator.ipow, operator.iand, operator.ior,
    operator.ixor, operator.ilshift, operator.irshift, operator.imatmul,
}  # fmt: skip


def fused_crelu(x: torch.Tensor, dim: int) -> torch.Tensor:
    """What ``fuse`` puts in place of an idiom: the fused op for the dtypes it
    supports, and for any other the composition the model wrote."""
    if torch.jit.is_scripting():  # TorchScript compiles this branch alone
        if x.is_floating_point():
            return torch.ops.crelu_ext.crelu(x, dim, False)[0]
        return torch.cat([torch.relu(x), torch.relu(-x)], dim)
    if x.dtype in FLOAT_DTYPES:
        return track(x, dim, crelu(x, dim))
    return torch.cat([torch.relu(x), torch.relu(-x)], dim)


# A call in any graph torch.fx traces, not traced through.
torch.fx.wrap("fused_crelu")


class _Tracer(torch.fx.Tracer):
    """torch.fx's tracer for one module's own forward: its submodules stay
    calls (each is fused on its own), and so do crelu_ext's functions."""

    def __init__(self) -> None:
        super().__init__(
            autowrap_modules=(math, sys.modules[__package__]),
            autowrap_functions=(crelu, fused_crelu),
        )

    def is_leaf_module(self, module: torch.nn.Module, qualified_name: str) -> bool:
        return True


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


def _trace(module: torch.nn.Module) -> torch.fx.Graph | None:
    """The graph of ``module``'s own forward, or None when torch.fx cannot
    trace it or it takes different paths in training and in eval (a graph
    keeps only one)."""
    modes = {submodule: submodule.training for submodule in module.modules()}
    graphs = []
    try:
        for training in (True, False):
            module.train(training)
            graphs.append(_Tracer().trace(module))
    except Exception:  # anything the forward raises on proxies: not traceable
        return None
    finally:  # each submodule's own mode: a frozen BatchNorm stays in eval
        for submodule, training in modes.items():
            submodule.training = training
    train, evaluation = (graph.python_code("self").src for graph in graphs)
    if train != evaluation:
        return None
    return graphs[module.training]


def _is_builtin(module: torch.nn.Module) -> bool:
    """torch's own modules and CReLU, whose code writes no idiom."""
    return isinstance(module, (CReLU, torch.jit.ScriptModule)) or type(
        module
    ).__module__.startswith("torch.")


def _define(source: str, namespace: dict) -> types.FunctionType:
    """The ``forward`` defined by ``source``; its text goes to linecache so
    that TorchScript and tracebacks can read it."""
    filename = f"<crelu_ext.fuse {next(_FILE_NUMBERS)}>"
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    namespace = dict(namespace)
    exec(compile(source, filename, "exec"), namespace)
    return namespace["forward"]


_FILE_NUMBERS = itertools.count()


class _Forward:
    """A fused module instance's ``forward``: one generated from the graph of
    its class's forward with the idioms replaced (or the class's own), run
    inside ``crelu_ext.recompute()`` when asked. Pickles as its source."""

    def __init__(self, module: torch.nn.Module, source: str | None, namespace: dict,
                 recompute: bool) -> None:  # fmt: skip
        self.module, self.source, self.namespace = module, source, namespace
        self.recompute = recompute
        self.function = None if source is None else _define(source, namespace)

    def __call__(self, *args, **kwargs):
        function = self.function or type(self.module).forward
        if not self.recompute or torch.compiler.is_compiling():  # recompute is eager-only
            return function(self.module, *args, **kwargs)
        with recompute_saved():
            return function(self.module, *args, **kwargs)

    def __getstate__(self) -> dict:
        # Modules pickle by name; the rest (torch's functions, fused_crelu,
        # constants) by reference or value.
        namespace = {
            name: _ModuleName(value.__name__) if isinstance(value, types.ModuleType) else value
            for name, value in self.namespace.items()
        }
        return {"module": self.module, "source": self.source, "namespace": namespace,
                "recompute": self.recompute}  # fmt: skip

    def __setstate__(self, state: dict) -> None:
        namespace = {
            name: importlib.import_module(value) if isinstance(value, _ModuleName) else value
            for name, value in state["namespace"].items()
        }
        self.__init__(state["module"], state["source"], namespace, state["recompute"])

    def prepare_scriptable(self) -> torch.nn.Module:
        """For ``torch.jit.script``, which compiles a class's forward: a shallow
        copy of the module, of a subclass with the fused forward if there is one
        (scripted code runs without recompute)."""
        module = self.module
        cls = type(module)
        if self.function is not None:
            cls = type(cls.__name__, (cls,), {"forward": self.function})
            cls.__module__, cls.__qualname__ = type(module).__module__, type(module).__qualname__
        copy = cls.__new__(cls)
        copy.__dict__.update(
            (name, value)
            for name, value in module.__dict__.items()
            if name not in ("forward", "__prepare_scriptable__")
        )
        copy._modules = dict(module._modules)  # TorchScript replaces the entries
        return copy


class _ModuleName(str):
    """A Python module in a pickled namespace."""


def fuse(model: torch.nn.Module, recompute: bool = False) -> torch.nn.Module:
    """Rewrites, in place, each hand-written CReLU in ``model``
    (``cat([relu(x), relu(-x)], d)``, ``relu(cat([x, -x], d))`` and their
    variants: see crelu_ext/fuse.py) to the fused op, and returns ``model``.

    It visits every module of the tree: where torch.fx can trace a module's
    own forward (its submodules stay calls) and the graph is the same in
    training and in eval, the idioms in that forward (and in the functions
    it calls) are replaced, by giving that instance a forward generated from
    the graph. A module it cannot trace keeps its forward; its submodules are
    fused all the same, so the model's other methods that call them get the
    fused op too. Idioms in a forward that torch.fx cannot trace (shape
    asserts, a dim computed from the rank) stay as written: compile the model
    with ``backend="crelu_ext"`` for those. The model keeps its class,
    parameters, buffers, state_dict keys and methods; it deep-copies, pickles
    (``torch.save``, then ``torch.load(weights_only=False)``) and scripts with
    ``torch.jit.script``.
    ``model.fused`` lists what was replaced, as ``"qualified.module: node"``
    (just ``"node"`` for ``model``'s own forward).

    The fused model computes the same outputs and gradients bit for bit, in
    training and in eval, with one limit: where ``x`` is NaN and ``x`` also
    feeds another op (a residual ``conv(crelu(x)) + x``, say), autograd sums
    the gradient parts in another order than for the composition, so the
    gradient at that position may differ by rounding; outputs and NaN
    positions stay equal.

    ``recompute=True`` runs ``model``'s forward inside
    :func:`crelu_ext.recompute`: the layer after each CReLU keeps CReLU's
    input, not its twice-as-large output.
    """
    fused = []
    for name, module in model.named_modules():
        graph = None if _is_builtin(module) else _trace(module)
        replaced = [] if graph is None else _Fuser(graph, dict(module.named_modules())).fuse()
        with_recompute = recompute and module is model
        if not (replaced or with_recompute):
            if isinstance(module.__dict__.get("forward"), _Forward):  # fused before
                del module.forward, module.__prepare_scriptable__
            continue
        fused += [f"{name}: {node}" if name else node for node in replaced]
        source, namespace = None, {}
        if replaced:
            graph.lint()
            code = graph.python_code("self")
            source, namespace = code.src, code.globals
        forward = _Forward(module, source, namespace, with_recompute)
        module.forward = forward
        module.__prepare_scriptable__ = forward.prepare_scriptable
    model.fused = fused
    return model


def dynamo_backend(graph_module: torch.fx.GraphModule, example_inputs):
    """``torch.compile(model, backend="crelu_ext")``: each graph Dynamo
    captures, its CReLU idioms replaced by the fused op, compiled by Inductor.
    Dynamo traces what torch.fx cannot (shape asserts, dims computed from the
    rank), so this rewrites idioms that ``fuse`` leaves in eager code."""
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
