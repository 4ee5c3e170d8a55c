"""``crelu_ext.fuse(model)``: the CReLU idioms a model writes by hand, rewritten
to the fused op with torch.fx.

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

import math
import operator
import sys

import torch
import torch.fx
import torch.nn.functional as F

from ._checks import FLOAT_DTYPES
from .functional import crelu
from .nn import CReLU

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
    if x.dtype in FLOAT_DTYPES:
        return crelu(x, dim)
    return torch.cat([torch.relu(x), torch.relu(-x)], dim)


class _Tracer(torch.fx.Tracer):
    """torch.fx's tracer, keeping crelu_ext's own module as a leaf."""

    def is_leaf_module(self, module: torch.nn.Module, qualified_name: str) -> bool:
        return isinstance(module, CReLU) or super().is_leaf_module(module, qualified_name)


def _trace(model: torch.nn.Module, training: bool) -> torch.fx.GraphModule:
    model.train(training)
    try:
        # Calls of crelu_ext.crelu (however it was imported) stay calls in the graph.
        tracer = _Tracer(
            autowrap_modules=(math, sys.modules[__package__]),
            autowrap_functions=(crelu, fused_crelu),
        )
        graph = tracer.trace(model)
    except Exception as error:
        raise RuntimeError(
            f"crelu_ext.fuse: torch.fx cannot trace {type(model).__name__} ({error}). "
            "Fuse the traceable submodule that holds the idiom instead, e.g. "
            "model.block = crelu_ext.fuse(model.block)"
        ) from error
    return torch.fx.GraphModule(tracer.root, graph, type(model).__name__)


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
    def __init__(self, module: torch.fx.GraphModule) -> None:
        self.graph = module.graph
        self.modules = dict(module.named_modules())
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


def fuse(model: torch.nn.Module) -> torch.fx.GraphModule:
    """Returns ``model`` traced with torch.fx, with each hand-written CReLU
    (``cat([relu(x), relu(-x)], d)``, ``relu(cat([x, -x], d))`` and their
    variants: see crelu_ext/fuse.py) replaced by the fused op.

    The result computes the same outputs and gradients bit for bit, in
    training and in eval, and shares ``model``'s parameters and submodules.
    Its ``fused`` attribute lists the names of the graph nodes that were
    replaced (empty when there were none).

    Raises RuntimeError when torch.fx cannot trace ``model``, or when its
    forward takes different paths in training and in eval (a traced graph
    would keep only one of them).
    """
    modes = {submodule: submodule.training for submodule in model.modules()}
    try:
        traced = {mode: _trace(model, mode) for mode in (True, False)}
    finally:  # each submodule's own mode: a frozen BatchNorm stays in eval
        for submodule, training in modes.items():
            submodule.training = training
    if traced[True].code != traced[False].code:
        raise RuntimeError(
            f"crelu_ext.fuse: {type(model).__name__}.forward takes different paths in "
            "training and in eval, and a traced graph keeps only one; fuse a submodule "
            "whose forward does not branch on self.training"
        )
    module = traced[model.training]
    module.training = model.training
    module.fused = _Fuser(module).fuse()
    module.graph.lint()
    module.recompile()
    return module
