"""The source rewrite behind ``crelu_ext.fuse``: a function's own code, each
CReLU idiom in it replaced by a call that runs the fused op when the idiom's
parts are still what they were, and the idiom itself otherwise.

A function is rewritten from its source (``inspect.getsourcelines``): the text
of each idiom is replaced by a call of a *site*, a small generated function
that takes the idiom's parts evaluated as the original evaluates them (the
callables ``torch.cat``, ``F.relu``, ``self.relu``..., ``x``, the dim, an
``inplace`` flag) and checks them at each call: the callables are torch's own
(a ReLU module: ``type(m) is nn.ReLU`` without hooks), ``x`` is a tensor of a
dtype the op takes, the dim an int, and the in-place flags keep the idiom one.
If so it runs the fused op, else the idiom as written, with those same values.
Every other character of the function stays as written, so the rest keeps its
Python meaning at each call: attributes, branches, globals, closures.

The rewritten text is compiled in the function's own globals and closure: the
def is compiled nested in an outer function whose parameters are the
function's free variables and the sites, so that the code reads the sites from
closure cells (the user's module globals are left alone), and, for a method,
in a class of the method's class's name, which gives private names the same
mangling and zero-argument ``super()`` its ``__class__`` cell (the original's).

Each site in the text reads ``(fused_crelu(x, d) if torch.jit.is_scripting()
else site(...))``: TorchScript compiles only the first branch, so the text
scripts wherever the original does. The text, at the original's line numbers,
is registered in ``linecache`` under a name of its own, for tracebacks (which
then show the rewritten line, and name the user's file and line) and for
``inspect.getsource`` (which TorchScript reads).

A call of a plain Python function or method that holds an idiom itself
(``max_min(x, self.dim)``) is rewritten the same way: the call goes through a
*redirect*, which calls the rewritten function when the callee is still the
original, and the callee otherwise.
"""

import __future__

import ast
import builtins
import contextlib
import copy
import dis
import inspect
import itertools
import linecache
import textwrap
import types
import weakref
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch.nn.modules import module as _hooks

from ._checks import FLOAT_DTYPES
from .functional import call_backend
from .recompute import recompute as _recompute
from .recompute import track

PREFIX = "__crelu_ext_"  # the names the rewrite adds; a function that uses one is left
_MAX_DEPTH = 3  # how deep calls are followed into the functions a forward calls
_CAT_NAMES = {"cat", "concat", "concatenate"}


# --- What a rewritten function runs ------------------------------------------


def fused_crelu(x: torch.Tensor, dim: int) -> torch.Tensor:
    """The fused op for the dtypes it takes, else the composition; what
    TorchScript compiles in place of an idiom, and what the graphs of
    ``backend="crelu_ext"`` call."""
    if torch.jit.is_scripting():  # TorchScript compiles this branch alone
        dtype = x.dtype
        if (
            dtype == torch.float32
            or dtype == torch.float64
            or dtype == torch.float16
            or dtype == torch.bfloat16
        ):
            return torch.ops.crelu_ext.crelu(x, dim, False)[0]
        return torch.cat([torch.relu(x), torch.relu(-x)], dim)
    if x.dtype in FLOAT_DTYPES:
        return track(x, dim, call_backend(x, dim, "auto"))
    return torch.cat([torch.relu(x), torch.relu(-x)], dim)


def _fused(x: torch.Tensor, dim: int) -> torch.Tensor:
    # A site's fused branch, once the site has checked x and dim.
    return track(x, dim, call_backend(x, dim, "auto"))


def recompute_if_eager():
    """``crelu_ext.recompute()`` in eager mode; nothing under a tracer (Dynamo,
    torch.export, torch.jit.trace), which must not see its global state."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing():
        return contextlib.nullcontext()
    return _recompute()


def _bare(module: torch.nn.Module) -> bool:
    """Whether calling ``module`` runs its class's forward and nothing else."""
    return not (
        module._forward_hooks
        or module._forward_pre_hooks
        or module._backward_hooks
        or module._backward_pre_hooks
        or _hooks._global_forward_hooks
        or _hooks._global_forward_pre_hooks
        or _hooks._global_backward_hooks
        or _hooks._global_backward_pre_hooks
        or "forward" in module.__dict__
    )


_DEFAULT_TORCH_FUNCTION = torch.Tensor.__torch_function__.__func__


def _plain_subclass(x, methods: tuple) -> bool:
    """Whether ``x`` is a tensor of a subclass that computes as a tensor does:
    no ``__torch_function__`` of its own (FakeTensor and Parameter disable it)
    and none of the methods the idiom calls overridden."""
    kind = type(x)
    if not issubclass(kind, torch.Tensor):
        return False
    function = kind.__torch_function__
    if not (
        function is torch._C._disabled_torch_function_impl
        or getattr(function, "__func__", None) is _DEFAULT_TORCH_FUNCTION
    ):
        return False
    return all(getattr(kind, name) is getattr(torch.Tensor, name) for name in methods)


def _redirect(original: types.FunctionType, rewritten: types.FunctionType):
    """A call of ``original`` (a function, or a method through its bound
    methods) goes to ``rewritten``; a call of anything else, as it was."""

    def call(callee, /, *args, **kwargs):
        # The type first: Dynamo takes `bound_method is function` for true.
        if type(callee) is types.MethodType:
            if callee.__func__ is original:
                return rewritten(callee.__self__, *args, **kwargs)
        elif callee is original:
            return rewritten(*args, **kwargs)
        return callee(*args, **kwargs)

    return call


def _redirect_super(owner: type, name: str, original, rewritten):
    """``super().name(...)`` in a method of ``owner``, called as
    ``call(self, ...)``: ``rewritten`` where ``super().name`` is still
    ``original``. The lookup walks the MRO itself, as Dynamo cannot tell
    which function a super() attribute is."""

    def call(instance, /, *args, **kwargs):
        mro = type(instance).__mro__
        for klass in mro[mro.index(owner) + 1 :]:
            if name in vars(klass):
                if vars(klass)[name] is original:
                    return rewritten(instance, *args, **kwargs)
                break
        return getattr(super(owner, instance), name)(*args, **kwargs)

    return call


# The names a site's generated code reads.
_SITE_GLOBALS = {
    "_cat": torch.cat,
    "_concat": torch.concat,
    "_concatenate": torch.concatenate,
    "_relu": torch.relu,
    "_F_relu": F.relu,
    "_relu_": torch.relu_,  # F.relu_ is torch.relu_
    "_ReLU": torch.nn.ReLU,
    "_neg": torch.neg,
    "_negative": torch.negative,
    "_mul": torch.mul,
    "_multiply": torch.multiply,
    "_Tensor": torch.Tensor,
    "_FLOAT": FLOAT_DTYPES,
    "_strided": torch.strided,
    "_bare": _bare,
    "_plain_subclass": _plain_subclass,
    "_fused": _fused,
}

# What a site checks of each part of its idiom, at each call and at fuse time.
_CHECKS = {
    "cat": "({v} is _cat or {v} is _concat or {v} is _concatenate)",
    # A ReLU called with its input only, by role: out of place (the positive
    # half, whose input is x itself), either, in place (the relu_ whose result
    # is dropped, the concatenation holding it).
    "relu-out": "({v} is _relu or {v} is _F_relu"
    " or (type({v}) is _ReLU and {v}.inplace is False and _bare({v})))",
    "relu-any": "({v} is _relu or {v} is _F_relu or {v} is _relu_"
    " or (type({v}) is _ReLU and _bare({v})))",
    "relu-in": "({v} is _relu_ or (type({v}) is _ReLU and {v}.inplace is True and _bare({v})))",
    "relu-flag": "{v} is _F_relu",  # F.relu(a, inplace)
    "flag-out": "{v} is False",
    "flag-in": "{v} is True",
    "neg": "({v} is _neg or {v} is _negative)",
    "mul": "({v} is _mul or {v} is _multiply)",
    "dim": "type({v}) is int",
}
_STATIC_CHECKS = {
    role: eval(f"lambda v: {check.format(v='v')}", dict(_SITE_GLOBALS))
    for role, check in _CHECKS.items()
}
_CALLEE_ROLES = {"cat", "relu-out", "relu-any", "relu-in", "relu-flag", "neg", "mul"}


# --- Fuse-time values -----------------------------------------------------------

_UNKNOWN = object()  # a value fuse cannot know without running the code


def _static_attribute(owner, name: str):
    """``getattr(owner, name)`` where that runs no code of the owner's (no
    property, no ``__getattr__`` but nn.Module's own lookup)."""
    if owner is _UNKNOWN:
        return _UNKNOWN
    if isinstance(owner, types.ModuleType):
        return vars(owner).get(name, _UNKNOWN)
    if isinstance(owner, torch.nn.Module):
        state = owner.__dict__
        if name in state:
            return state[name]
        for store in ("_parameters", "_buffers", "_modules"):
            if name in state.get(store, ()):
                return state[store][name]
    try:
        value = inspect.getattr_static(owner, name)
    except AttributeError:
        return _UNKNOWN
    is_class = isinstance(owner, type)
    if isinstance(value, staticmethod):
        return value.__func__
    if isinstance(value, classmethod):
        return types.MethodType(value.__func__, owner if is_class else type(owner))
    if isinstance(value, types.FunctionType):
        in_instance = not is_class and name in getattr(owner, "__dict__", {})
        return value if is_class or in_instance else types.MethodType(value, owner)
    if hasattr(type(value), "__get__") and not isinstance(value, (type, types.BuiltinFunctionType)):
        return _UNKNOWN  # a property or another descriptor: its code would run
    return value


class _Scope:
    """Where a function's names point at fuse time: ``self`` (the first
    parameter of a method) to the instance, its free variables to their cells,
    other names to its globals and builtins; its local names to nothing known."""

    def __init__(self, fn, instance, self_name: str | None, local_names: set) -> None:
        self.fn, self.instance, self.self_name = fn, instance, self_name
        self.local_names = local_names
        self.rebound: set = set()  # names the function assigns (its parameters aside)
        self.cells = dict(zip(fn.__code__.co_freevars, fn.__closure__ or (), strict=True))

    def name(self, name: str):
        if name == self.self_name:
            return self.instance
        if name in self.local_names:
            return _UNKNOWN
        if name in self.cells:
            try:
                return self.cells[name].cell_contents
            except ValueError:  # an empty cell
                return _UNKNOWN
        namespace = self.fn.__globals__
        if name in namespace:
            return namespace[name]
        builtin = namespace.get("__builtins__", builtins)
        builtin = builtin if isinstance(builtin, dict) else vars(builtin)
        return builtin.get(name, _UNKNOWN)

    def value(self, node: ast.expr):
        """The value of a constant, a name or an attribute chain; else _UNKNOWN."""
        if isinstance(node, ast.Constant):
            return node.value
        if _is_negative_constant(node):
            return -node.operand.value
        if isinstance(node, ast.Name):
            return self.name(node.id)
        if isinstance(node, ast.Attribute):
            if _is_super_call(node.value):
                return self.super_attribute(node.attr)
            return _static_attribute(self.value(node.value), node.attr)
        return _UNKNOWN

    def super_attribute(self, name: str):
        cell = self.cells.get("__class__")
        if cell is None or self.instance is None or self.instance is _UNKNOWN:
            return _UNKNOWN
        try:
            owner = cell.cell_contents
            mro = type(self.instance).__mro__
            later = mro[mro.index(owner) + 1 :]
        except ValueError:
            return _UNKNOWN
        for klass in later:
            if name in vars(klass):
                value = vars(klass)[name]
                if isinstance(value, types.FunctionType):
                    return types.MethodType(value, self.instance)
                return _UNKNOWN
        return _UNKNOWN


def _is_negative_constant(node) -> bool:
    return (
        isinstance(node, ast.UnaryOp)
        and isinstance(node.op, ast.USub)
        and isinstance(node.operand, ast.Constant)
        and type(node.operand.value) in (int, float)
    )


def _is_minus_one(node) -> bool:
    if isinstance(node, ast.Constant):
        return type(node.value) in (int, float) and node.value == -1
    return _is_negative_constant(node) and node.operand.value == 1


def _is_super_call(node) -> bool:
    return (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id == "super"
        and not node.args
        and not node.keywords
    )


def _is_chain(node) -> bool:
    """A name, or attributes of a name (``torch.nn.functional.relu``,
    ``self.relu``): evaluating it runs no call."""
    while isinstance(node, ast.Attribute):
        node = node.value
    return isinstance(node, ast.Name)


def _is_callee(node) -> bool:
    return _is_chain(node) or (isinstance(node, ast.Attribute) and _is_super_call(node.value))


# --- Finding the idioms -----------------------------------------------------------


@dataclass
class _Part:
    """An expression of an idiom that its site takes evaluated, and what the
    site checks of it (a key of _CHECKS, "x", or None)."""

    node: ast.expr
    role: str | None


@dataclass
class _Idiom:
    kind: str  # "cat-of-relus", "relu-of-cat", "pair" or "call"
    node: ast.expr  # what the site call replaces (a pair: the first statement's value)
    line: int  # in the function's text
    display: str
    parts: list = field(default_factory=list)
    x: ast.expr | None = None
    dim: ast.expr | None = None
    methods: tuple = ()  # tensor methods the idiom calls on x or on what it computes
    after: ast.stmt | None = None  # a pair's second statement
    target: str | None = None  # a pair's name
    problem: str | None = None  # why it is left as written


def _relu(node, role: str):
    """``(operand, parts, methods)`` when ``node`` is a ReLU of one operand in
    ``role`` ("out", "any" or "in"): ``f(a)``, ``F.relu(a, flag)``, ``a.relu()``."""
    if not isinstance(node, ast.Call):
        return None
    func, args, keywords = node.func, node.args, node.keywords
    if isinstance(func, ast.Attribute) and func.attr in ("relu", "relu_") and not args:
        in_place = func.attr == "relu_"
        if keywords or (role == "out" and in_place) or (role == "in" and not in_place):
            return None
        return func.value, [], (func.attr,)
    if not _is_chain(func) or not args or any(isinstance(a, ast.Starred) for a in args):
        return None
    if len(args) == 1 and not keywords:
        return args[0], [_Part(func, f"relu-{role}")], ()
    if len(args) == 2 and not keywords:
        flag = args[1]
    elif len(args) == 1 and len(keywords) == 1 and keywords[0].arg == "inplace":
        flag = keywords[0].value
    else:
        return None
    flag_part = _Part(flag, None if role == "any" else f"flag-{role}")
    return args[0], [_Part(func, "relu-flag"), flag_part], ()


def _negation(node):
    """``(operand, parts, methods)`` when ``node`` computes ``-operand`` exactly:
    ``-a``, ``a.neg()``, ``torch.neg(a)``, ``a * -1``, ``-1 * a``, ``a.mul(-1)``."""
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        return node.operand, [], ("__neg__",)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mult):
        if _is_minus_one(node.right):
            return node.left, [], ("__mul__",)
        if _is_minus_one(node.left):
            return node.right, [], ("__rmul__",)
        return None
    if not isinstance(node, ast.Call) or node.keywords:
        return None
    func, args = node.func, node.args
    if any(isinstance(a, ast.Starred) for a in args):
        return None
    if isinstance(func, ast.Attribute):  # a method of the operand: a.neg(), a.mul(-1)
        if func.attr in ("neg", "negative") and not args:
            return func.value, [], (func.attr,)
        if func.attr == "mul" and len(args) == 1 and _is_minus_one(args[0]):
            return func.value, [], ("mul",)
    if _is_chain(func) and len(args) == 1:  # torch.neg(a)
        return args[0], [_Part(func, "neg")], ()
    if _is_chain(func) and len(args) == 2 and _is_minus_one(args[1]):  # torch.mul(a, -1)
        return args[0], [_Part(func, "mul")], ()
    return None


def _cat(node):
    """``(tensors, parts, dim)`` when ``node`` concatenates two tensors."""
    if not isinstance(node, ast.Call) or not _is_chain(node.func):
        return None
    args, keywords = node.args, node.keywords
    if not args or len(args) > 2 or any(isinstance(a, ast.Starred) for a in args):
        return None
    dim = args[1] if len(args) == 2 else None
    if keywords:
        if dim is not None or len(keywords) != 1 or keywords[0].arg not in ("dim", "axis"):
            return None
        dim = keywords[0].value
    tensors = args[0]
    if not isinstance(tensors, (ast.List, ast.Tuple)) or len(tensors.elts) != 2:
        return None
    if any(isinstance(e, ast.Starred) for e in tensors.elts):
        return None
    if dim is not None and _binds_or_suspends(dim):
        return None
    parts = [_Part(node.func, "cat")]
    if dim is not None:
        parts.append(_Part(dim, "dim"))
    return tensors.elts, parts, dim


def _binds_or_suspends(node) -> bool:
    """Whether evaluating ``node`` may bind a name or suspend."""
    kinds = (ast.NamedExpr, ast.Await, ast.Yield, ast.YieldFrom, ast.Lambda)
    return any(isinstance(n, kinds) for n in ast.walk(node))


def _same_operand(a, b) -> str | None:
    """``"name"`` when ``a`` and ``b`` are the same plain name, ``"expression"``
    when they are the same expression written twice (``x.t()``, ``self.h``),
    which fuse reports and leaves, else None."""
    if isinstance(a, ast.Name) and isinstance(b, ast.Name):
        return "name" if a.id == b.id else None
    return "expression" if ast.dump(a) == ast.dump(b) else None


def _cat_of_negation(node):
    """``(x, parts, dim, methods)`` for ``cat([x, -x], d)``."""
    cat = _cat(node)
    if cat is None:
        return None
    (first, second), cat_parts, dim = cat
    negation = _negation(second)
    if negation is None:
        return None
    operand, negation_parts, methods = negation
    same = _same_operand(first, operand)
    if same is None:
        return None
    parts = [cat_parts[0], _Part(first, "x"), *negation_parts, *cat_parts[1:]]
    return first, parts, dim, methods, same


def _match_expression(node, text: str) -> _Idiom | None:
    # cat([relu(x), relu(-x)], d)
    cat = _cat(node)
    if cat is not None:
        (positive, negative), cat_parts, dim = cat
        relu_positive = _relu(positive, "out")
        relu_negative = _relu(negative, "any")
        if relu_positive is None or relu_negative is None:
            return None
        negation = _negation(relu_negative[0])
        if negation is None:
            return None
        x = relu_positive[0]
        same = _same_operand(x, negation[0])
        if same is None:
            return None
        parts = [cat_parts[0], *relu_positive[1], _Part(x, "x"), *relu_negative[1]]
        parts += [*negation[1], *cat_parts[1:]]
        methods = relu_positive[2] + relu_negative[2] + negation[2]
        return _idiom("cat-of-relus", node, text, parts, x, dim, methods, same)
    # relu(cat([x, -x], d)), cat([x, -x], d).relu()
    relu = _relu(node, "any")
    if relu is None:
        return None
    inner = _cat_of_negation(relu[0])
    if inner is None:
        return None
    x, parts, dim, methods, same = inner
    return _idiom("relu-of-cat", node, text, relu[1] + parts, x, dim, relu[2] + methods, same)


def _idiom(kind, node, text, parts, x, dim, methods, same, **more) -> _Idiom:
    idiom = _Idiom(kind, node, node.lineno, "", parts, x, dim, tuple(dict.fromkeys(methods)))
    for name, value in more.items():
        setattr(idiom, name, value)
    idiom.display = _display(idiom)
    if same == "expression":
        operand = ast.unparse(x)
        idiom.problem = (
            f"its operand `{operand}` is not a plain name, and fuse evaluates only a plain "
            f"name once for both halves; assign it to a name first (`h = {operand}`)"
        )
    return idiom


def _display(idiom: _Idiom) -> str:
    if idiom.kind == "pair":
        return f"{idiom.target} = {ast.unparse(idiom.node)}; {ast.unparse(idiom.after)}"
    return ast.unparse(idiom.node)


def _match_pair(first: ast.stmt, second: ast.stmt, text: str) -> _Idiom | None:
    """``t = cat([x, -x], d)`` and, right after it, ``t = relu(t)``,
    ``return relu(t)`` or an in-place ``relu_(t)``."""
    if not (
        isinstance(first, ast.Assign)
        and len(first.targets) == 1
        and isinstance(first.targets[0], ast.Name)
    ):
        return None
    target = first.targets[0].id
    inner = _cat_of_negation(first.value)
    if inner is None:
        return None
    if isinstance(second, ast.Assign):
        if not (
            len(second.targets) == 1
            and isinstance(second.targets[0], ast.Name)
            and second.targets[0].id == target
        ):
            return None
        role = "any"
    elif isinstance(second, ast.Return) and second.value is not None:
        role = "any"
    elif isinstance(second, ast.Expr):
        role = "in"  # its result dropped: the concatenation must hold it
    else:
        return None
    relu = _relu(second.value, role)
    if relu is None or not (isinstance(relu[0], ast.Name) and relu[0].id == target):
        return None
    x, parts, dim, methods, same = inner
    return _idiom(
        "pair",
        first.value,
        text,
        parts + relu[1],
        x,
        dim,
        methods + relu[2],
        same,
        after=second,
        target=target,
    )


def _statement_lists(function: ast.AST):
    for node in ast.walk(function):
        for name in ("body", "orelse", "finalbody"):
            statements = getattr(node, name, None)
            if isinstance(statements, list) and statements and isinstance(statements[0], ast.stmt):
                yield statements


def _find(function: ast.FunctionDef, text: str) -> list[_Idiom]:
    found, taken = [], set()
    for statements in _statement_lists(function):
        for first, second in itertools.pairwise(statements):
            pair = _match_pair(first, second, text)
            if pair is not None and id(first) not in taken:
                found.append(pair)
                taken.update((id(first), id(second)))
    for node in ast.walk(function):
        if isinstance(node, ast.Call):
            idiom = _match_expression(node, text)
            if idiom is not None:
                found.append(idiom)
            elif _is_callee(node.func) and not _is_super_call(node):
                found.append(_Idiom("call", node, node.lineno, ast.unparse(node)))
    # Keep each idiom once: no idiom inside another's parts.
    spans = [(_span(i.node), i) for i in found if i.kind != "call"]
    spans += [(_span(i.after), i) for i in found if i.kind == "pair"]
    kept = []
    for idiom in found:
        inside = any(
            other is not idiom and _contains(span, _span(idiom.node)) for span, other in spans
        )
        if not inside:
            kept.append(idiom)
    kept.sort(key=lambda i: (i.node.lineno, i.node.col_offset))
    return kept


def _span(node) -> tuple:
    return (node.lineno, node.col_offset, node.end_lineno, node.end_col_offset)


def _contains(outer: tuple, inner: tuple) -> bool:
    return outer[:2] <= inner[:2] and inner[2:] <= outer[2:]


# --- A function's source, read once -------------------------------------------------


@dataclass
class _Source:
    """A function's text (dedented), where it starts in its file, its def and
    idioms; or, where it cannot be read or rewritten, why."""

    function_ref: weakref.ref  # the function (weakly: _SOURCES holds its _Source by it)
    text: str = ""
    start: int = 0  # the file's line of the text's first line
    function: ast.FunctionDef | None = None
    idioms: list = field(default_factory=list)
    unreadable: str | None = None  # no text: why
    blocked: str | None = None  # a text, but not one fuse rewrites: why
    self_name: str | None = None
    local_names: set = field(default_factory=set)
    rebound: set = field(default_factory=set)
    class_name: str | None = None
    verified: bool | None = None  # whether the text compiles to the function's code
    compiled: dict = field(default_factory=dict)  # its rewrites, by what they replace

    @property
    def fn(self) -> types.FunctionType:
        return self.function_ref()


_SOURCES: "weakref.WeakKeyDictionary[types.FunctionType, _Source]" = weakref.WeakKeyDictionary()
_TORCH_COMPILE = (
    'torch.compile(model, backend="crelu_ext") rewrites it in the graphs Dynamo captures'
)


def _source(fn: types.FunctionType) -> _Source:
    source = _SOURCES.get(fn)
    if source is None:
        source = _SOURCES[fn] = _read(fn)
    return source


def _read(fn: types.FunctionType) -> _Source:
    source = _Source(weakref.ref(fn))
    code = fn.__code__
    if code.co_name == "<lambda>":
        source.unreadable = f"it is a lambda; {_TORCH_COMPILE}"
        return source
    try:
        lines, start = inspect.getsourcelines(fn)
        text = textwrap.dedent("".join(lines))
        tree = ast.parse(text)
    except (OSError, TypeError, SyntaxError) as error:
        where = code.co_filename
        source.unreadable = (
            f"the source of {fn.__qualname__} cannot be read (defined in {where}: {error}); "
            f"{_TORCH_COMPILE}"
        )
        return source
    function = tree.body[0] if len(tree.body) == 1 else None
    if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)) or (
        function.name != code.co_name
    ):
        source.unreadable = (
            f"the source read for {fn.__qualname__} is not its def; {_TORCH_COMPILE}"
        )
        return source
    source.text, source.start, source.function = text, start, function
    source.idioms = _find(function, text)
    if isinstance(function, ast.AsyncFunctionDef):
        source.blocked = "it is an async function"
    elif function.decorator_list:
        decorators = ", ".join(f"@{ast.unparse(d)}" for d in function.decorator_list)
        source.blocked = f"{fn.__qualname__} is decorated ({decorators}); {_TORCH_COMPILE}"
    elif any(
        (isinstance(n, ast.Name) and n.id.startswith(PREFIX))
        or (isinstance(n, ast.arg) and n.arg.startswith(PREFIX))
        for n in ast.walk(function)
    ):
        source.blocked = f"{fn.__qualname__} uses names that start with {PREFIX}"
    parameters = [*function.args.posonlyargs, *function.args.args]
    source.self_name = parameters[0].arg if parameters else None
    source.local_names = _local_names(function)
    source.rebound = {
        node.id
        for node in ast.walk(function)
        if isinstance(node, ast.Name) and not isinstance(node.ctx, ast.Load)
    }
    parts = fn.__qualname__.split(".")
    if len(parts) > 1 and parts[-2] != "<locals>":
        source.class_name = parts[-2]
    return source


def _compiles_to(source: _Source, code: types.CodeType) -> bool:
    """Whether the text read, compiled as fuse compiles it, gives ``code``: a
    file edited since its import, or a def that is not the function's, does not.
    Code that pytest's assertion rewriting compiled (its names start with "@py")
    is not the text's own compilation: it is taken as it is."""
    if _rewritten_by_pytest(code):
        return True
    try:
        compiled = _code(source, source.text, "<crelu_ext.fuse check>", (), recompute=False)
    except _CannotCompile:
        return False
    return _same_code(compiled, code)


def _rewritten_by_pytest(code: types.CodeType) -> bool:
    names = (*code.co_names, *code.co_varnames)
    if any(name.startswith("@py") for name in names):
        return True
    return any(
        _rewritten_by_pytest(constant)
        for constant in code.co_consts
        if isinstance(constant, types.CodeType)
    )


def _same_code(a: types.CodeType, b: types.CodeType) -> bool:
    """Whether two code objects run the same instructions on the same names
    and constants: a method call compiles to LOAD_METHOD or to LOAD_ATTR after
    a NULL (where the compiler sees the name imported in the same file), and
    jumps are compared by the instruction they land on."""
    fields = ("co_names", "co_varnames", "co_freevars", "co_cellvars", "co_argcount")
    if any(getattr(a, name) != getattr(b, name) for name in fields):
        return False
    first, second = _instructions(a), _instructions(b)
    if len(first) != len(second):
        return False
    for (name, value), (other_name, other_value) in zip(first, second, strict=True):
        if name != other_name:
            return False
        if isinstance(value, types.CodeType) and isinstance(other_value, types.CodeType):
            if not _same_code(value, other_value):
                return False
        elif type(value) is not type(other_value) or not (
            value == other_value or (value != value and other_value != other_value)
        ):
            return False
    return True


def _instructions(code: types.CodeType) -> list:
    instructions = list(dis.get_instructions(code))
    index = {instruction.offset: n for n, instruction in enumerate(instructions)}
    jumps = set(dis.hasjrel) | set(dis.hasjabs)
    out = []
    for instruction in instructions:
        name = "LOAD_ATTR" if instruction.opname == "LOAD_METHOD" else instruction.opname
        value = instruction.argval
        if instruction.opcode in jumps:
            value = index.get(value, value)
        out.append((name, value))
    return out


def _local_names(function: ast.AST) -> set:
    """The names bound in ``function`` or in the scopes nested in it."""
    names, declared_global = set(), set()
    for node in ast.walk(function):
        if isinstance(node, ast.Name) and not isinstance(node.ctx, ast.Load):
            names.add(node.id)
        elif isinstance(node, ast.arg):
            names.add(node.arg)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).partition(".")[0] for a in node.names)
        elif isinstance(node, ast.ExceptHandler) and node.name:
            names.add(node.name)
        elif isinstance(node, (ast.Global, ast.Nonlocal)):
            declared_global.update(node.names)
        elif type(node).__name__ in ("MatchAs", "MatchStar") and getattr(node, "name", None):
            names.add(node.name)
        elif type(node).__name__ == "MatchMapping" and getattr(node, "rest", None):
            names.add(node.rest)
    names.discard(getattr(function, "name", None))
    return names - declared_global


def mentions_cat(fn) -> bool:
    """Whether the code of ``fn`` (or of functions nested in it) names a
    concatenation, where its source cannot be read."""
    code = getattr(fn, "__code__", None)
    stack = [code] if code is not None else []
    while stack:
        code = stack.pop()
        if _CAT_NAMES & set(code.co_names):
            return True
        stack.extend(c for c in code.co_consts if isinstance(c, types.CodeType))
    return False


# --- Rewriting ----------------------------------------------------------------------


class Left(NamedTuple):
    """An idiom left as written, and why."""

    function: str
    line: int | None
    idiom: str
    reason: str


@dataclass
class Rewrite:
    function: types.FunctionType | None  # None: nothing to rewrite, or it cannot be
    fused: list = field(default_factory=list)  # the idioms replaced
    left: list = field(default_factory=list)  # Left entries
    reason: str | None = None  # why the function itself is left as written


def rewrite(
    fn: types.FunctionType,
    instance: Any = None,
    *,
    recompute: bool = False,
    scan: bool = True,
    _seen: frozenset = frozenset(),
) -> Rewrite:
    """``fn`` with each idiom that holds for ``instance`` (its ``self``, or
    None for a function that has none) replaced, and, with ``recompute``, its
    body inside ``crelu_ext.recompute()``; its calls of functions that hold
    idioms go to those functions rewritten. ``scan=False`` replaces nothing."""
    if not scan and not recompute:
        return Rewrite(None)
    if getattr(fn, "__wrapped__", None) is not None:  # a decorator's wrapper
        return _decorated(fn, instance, recompute, scan)
    source = _source(fn)
    if source.unreadable is not None:
        left = []
        # A forward whose code names a concatenation may write an idiom; a
        # function it calls is not named for that alone.
        if scan and not _seen and mentions_cat(fn):
            left.append(Left(fn.__qualname__, fn.__code__.co_firstlineno, "", source.unreadable))
        return Rewrite(None, [], left, source.unreadable)
    scope = _Scope(fn, instance, source.self_name if instance is not None else None,
                   source.local_names)  # fmt: skip
    scope.rebound = source.rebound
    chosen, fused, left = [], [], []
    replaced = []  # Left entries for what is chosen, should the function be left after all
    for index, idiom in enumerate(source.idioms if scan else ()):
        line = idiom.line + source.start - 1
        if idiom.kind == "call":
            if len(_seen) >= _MAX_DEPTH or fn in _seen:
                continue
            redirect = _follow(idiom, scope, _seen | {fn})
            if redirect is None:
                continue
            callee, inner = redirect
            left += inner.left
            if inner.function is not None:
                chosen.append((index, callee, inner.function))
                fused += [f"{callee.__qualname__}: {what}" for what in inner.fused]
                replaced += [Left(callee.__qualname__, None, what, "") for what in inner.fused]
            continue
        verdict = _holds(idiom, scope)
        if verdict is None:
            continue  # not a CReLU here
        reason = verdict if isinstance(verdict, str) else idiom.problem
        if reason is not None:
            left.append(Left(fn.__qualname__, line, idiom.display, reason))
            continue
        chosen.append((index, None, None))
        fused.append(idiom.display)
        replaced.append(Left(fn.__qualname__, line, idiom.display, ""))
    if not chosen and not recompute:
        return Rewrite(None, [], left)
    if source.blocked is None and source.verified is None:
        source.verified = _compiles_to(source, fn.__code__)
        if not source.verified:
            source.blocked = (
                f"the source of {fn.__qualname__} in {fn.__code__.co_filename} is not the code "
                f"it runs (was the file changed after it was imported?); {_TORCH_COMPILE}"
            )
    if source.blocked is not None:
        left += [entry._replace(reason=source.blocked) for entry in replaced]
        return Rewrite(None, [], left, source.blocked)
    key = (tuple((index, inner) for index, _, inner in chosen), recompute)
    function = source.compiled.get(key)
    if function is None:
        try:
            function = _compile(source, chosen, recompute)
        except _CannotCompile as error:
            left += [entry._replace(reason=str(error)) for entry in replaced]
            return Rewrite(None, [], left, str(error))
        source.compiled[key] = function
    return Rewrite(function, fused, left)


def _decorated(fn, instance, recompute: bool, scan: bool) -> Rewrite:
    """A wrapper is left as written; the idioms of what it wraps are named."""
    reason = f"{fn.__qualname__} is decorated (a wrapper of it runs); {_TORCH_COMPILE}"
    wrapped = inspect.unwrap(fn)
    left = []
    if scan and isinstance(wrapped, types.FunctionType):
        inner = rewrite(wrapped, instance, scan=True)
        left = inner.left + [Left(wrapped.__qualname__, None, what, reason) for what in inner.fused]
    return Rewrite(None, [], left, reason)


def _holds(idiom: _Idiom, scope: _Scope):
    """True when the idiom's parts are what its site checks for, as far as
    fuse can tell now; None when they are not (no CReLU: left silently); a
    reason when a callable cannot be known at fuse time."""
    unknown = []
    for part in idiom.parts:
        if part.role in (None, "x"):
            continue
        value = scope.value(part.node)
        if value is _UNKNOWN:
            if part.role in _CALLEE_ROLES:
                unknown.append(ast.unparse(part.node))
            continue
        try:
            if not _STATIC_CHECKS[part.role](value):
                return None
        except Exception:  # an object that refuses the check: not torch's
            return None
    if unknown:
        names = ", ".join(f"`{name}`" for name in dict.fromkeys(unknown))
        return f"fuse cannot tell what {names} will be when called (a local name); {_TORCH_COMPILE}"
    return True


def _follow(idiom: _Idiom, scope: _Scope, seen: frozenset):
    """For a call of a function or method whose code holds idioms:
    ``(function, its rewrite)``."""
    callee = scope.value(idiom.node.func)
    instance = None
    if isinstance(callee, types.MethodType):
        callee, instance = callee.__func__, callee.__self__
    if not isinstance(callee, types.FunctionType) or _is_library(callee):
        return None
    if _is_super_call(getattr(idiom.node.func, "value", None)) and not _super_redirectable(scope):
        return None
    inner = rewrite(callee, instance, _seen=seen)
    return callee, inner


def _super_redirectable(scope: _Scope) -> bool:
    """Whether ``super()`` in the function is ``super(__class__, self)`` with the
    ``self`` its text names: a method whose first parameter is never rebound."""
    return (
        scope.self_name is not None
        and "__class__" in scope.cells
        and scope.self_name not in scope.rebound
    )


def _is_library(fn: types.FunctionType) -> bool:
    """torch's code and crelu_ext's, which write no idiom to rewrite."""
    module = getattr(fn, "__module__", None) or ""
    return module.partition(".")[0] in ("torch", "crelu_ext", "typing", "functools")


class _CannotCompile(Exception):
    pass


_NUMBERS = itertools.count()


def _compile(source: _Source, chosen: list, recompute: bool) -> types.FunctionType:
    """The function ``source.fn`` with the chosen idioms replaced."""
    fn = source.fn
    text = source.text
    offsets = _Offsets(text)
    cells = {
        f"{PREFIX}fused__": fused_crelu,
        f"{PREFIX}is_scripting__": torch.jit.is_scripting,
    }
    edits = []  # (start, end, replacement)
    for number, (index, callee, inner) in enumerate(chosen):
        idiom = source.idioms[index]
        site = f"{PREFIX}{number}__"
        if idiom.kind == "call":
            helper = f"{PREFIX}{number}_function__"
            cells[helper] = inner
            func = idiom.node.func
            if _is_super_call(func.value if isinstance(func, ast.Attribute) else None):
                owner = dict(zip(fn.__code__.co_freevars, fn.__closure__, strict=True))
                owner = owner["__class__"].cell_contents
                cells[site] = _redirect_super(owner, func.attr, callee, inner)
                first = source.self_name
            else:
                cells[site] = _redirect(callee, inner)
                first = None
            edits += _redirect_edits(idiom.node, text, offsets, site, helper, callee, first)
            continue
        cells[site] = _site(idiom)
        edits += _site_edits(idiom, text, offsets, site)
    rewritten = _apply(text, edits)
    filename = f"<crelu_ext.fuse {next(_NUMBERS)}: {fn.__qualname__}, " + (
        f"{fn.__code__.co_filename}:{source.start}>"
    )
    # The text at the original's line numbers: tracebacks and inspect.getsource.
    _TEXTS[filename] = "\n" * (source.start - 1) + rewritten
    register_texts()
    return _build(source, rewritten, filename, cells, recompute)


_TEXTS: dict = {}  # the rewritten functions' files: name -> text


def register_texts() -> None:
    """Puts the rewritten functions' text in linecache, where something cleared
    it (TorchScript reads it there)."""
    for filename, text in _TEXTS.items():
        if filename not in linecache.cache:
            linecache.cache[filename] = (len(text), None, text.splitlines(True), filename)


class _Offsets:
    """(line, column in UTF-8 bytes), as ast gives them -> index in the text."""

    def __init__(self, text: str) -> None:
        self.lines = text.splitlines(True)
        self.starts = [0, *itertools.accumulate(len(line) for line in self.lines)]

    def __call__(self, line: int, column: int) -> int:
        prefix = self.lines[line - 1].encode()[:column].decode()
        return self.starts[line - 1] + len(prefix)

    def span(self, node) -> tuple[int, int]:
        return self(node.lineno, node.col_offset), self(node.end_lineno, node.end_col_offset)


def _segment(text, offsets, node) -> str:
    start, end = offsets.span(node)
    return text[start:end]


def _padded(replacement: str, original: str) -> str:
    """``replacement`` (parenthesized) with as many line breaks as ``original``."""
    missing = original.count("\n") - replacement.count("\n")
    return replacement[:-1] + "\n" * max(missing, 0) + replacement[-1]


def _site_edits(idiom: _Idiom, text: str, offsets: _Offsets, site: str) -> list:
    arguments = []
    for part in _site_parts(idiom):
        arguments.append(_segment(text, offsets, part.node))
    dim = "0" if idiom.dim is None else ast.unparse(idiom.dim)
    scripted = f"{PREFIX}fused__({idiom.x.id}, {dim})"
    call = f"{site}({', '.join(arguments)})"
    replacement = f"({scripted} if {PREFIX}is_scripting__() else {call})"
    start, end = offsets.span(idiom.node)
    edits = [(start, end, _padded(replacement, text[start:end]))]
    if idiom.kind == "pair":
        start, end = offsets.span(idiom.after)
        original = text[start:end]
        if isinstance(idiom.after, ast.Return):
            edits.append((start, end, "return " + _padded(f"({idiom.target})", original)))
        elif "\n" in original:
            edits.append((start, end, _padded("(None)", original)))
        else:
            edits.append((start, end, "pass"))
    return edits


def _redirect_edits(call, text, offsets, site, helper, callee, first=None) -> list:
    """``f(args)`` -> ``(f'(args) if scripting else redirect(f, args))``, as two
    edits around the arguments, which may hold idioms of their own. In
    TorchScript: the rewritten function itself where it is a plain function,
    the original call for a method (both unparsed on one line)."""
    start, end = offsets.span(call)
    func_start, func_end = offsets.span(call.func)
    opening = func_end + len(text[func_end:end]) - len(text[func_end:end].lstrip())
    if text[opening : opening + 1] != "(" or text[end - 1 : end] != ")":
        raise _CannotCompile("a call written in an unexpected way")
    if isinstance(call.func, ast.Name) and isinstance(callee, types.FunctionType):
        scripted = ast.unparse(ast.Call(ast.Name(helper, ast.Load()), call.args, call.keywords))
    else:
        scripted = ast.unparse(call)
    comma = ", " if call.args or call.keywords else ""
    first = text[func_start:func_end] if first is None else first  # super(): self
    head = f"({scripted} if {PREFIX}is_scripting__() else {site}({first}{comma}"
    return [(start, opening + 1, head), (end - 1, end, "))")]


def _apply(text: str, edits: list) -> str:
    """``text`` with each ``(start, end, replacement)`` made, the ones inside
    another's arguments included (a redirect's arguments may hold idioms)."""
    edits = sorted(edits)
    out, position = [], 0
    for start, end, replacement in edits:
        if start < position:
            raise _CannotCompile("idioms overlap")
        out += [text[position:start], replacement]
        position = end
    out.append(text[position:])
    return "".join(out)


def _site_parts(idiom: _Idiom) -> list:
    """The parts a site takes, x once, in the order the original evaluates
    them (a callee before its arguments, arguments left to right: the order
    they are written in)."""
    parts, seen_x = [], False
    for part in idiom.parts:
        if part.role == "x":
            if seen_x:
                continue
            seen_x = True
        parts.append(part)
    return sorted(parts, key=lambda part: (part.node.lineno, part.node.col_offset))


_SITES: dict = {}


def _site(idiom: _Idiom) -> types.FunctionType:
    """The generated function that runs an idiom: the fused op when its
    checks pass, else the idiom as written with the values it was given."""
    parts = _site_parts(idiom)
    names = {id(part.node): f"a{i}" for i, part in enumerate(parts)}
    x_name = next(names[id(p.node)] for p in parts if p.role == "x")
    checks = []
    dim_name = "0"
    for part in parts:
        name = names[id(part.node)]
        if part.role == "x":
            methods = repr(idiom.methods)
            checks.append(
                f"(type({name}) is _Tensor or _plain_subclass({name}, {methods}))"
                f" and {name}.dtype in _FLOAT and {name}.layout == _strided"
            )
        elif part.role is not None:
            checks.append(_CHECKS[part.role].format(v=name))
        if part.role == "dim":
            dim_name = name
    # Callables first: they are the cheapest and the most likely to differ.
    checks.sort(key=lambda check: "_Tensor" in check)
    body = _fallback(idiom, names, x_name)
    lines = [
        f"def site({', '.join(names.values())}):",
        f"    if {' and '.join(checks)}:",
        f"        return _fused({x_name}, {dim_name})",
        *(f"    {line}" for line in body),
    ]
    code = "\n".join(lines) + "\n"
    function = _SITES.get(code)
    if function is None:
        filename = f"<crelu_ext.fuse site {len(_SITES)}>"
        linecache.cache[filename] = (len(code), None, code.splitlines(True), filename)
        namespace = dict(_SITE_GLOBALS)
        exec(compile(code, filename, "exec"), namespace)
        function = _SITES[code] = namespace["site"]
        function.__qualname__ = function.__name__ = f"crelu_site_{idiom.kind.replace('-', '_')}"
    return function


class _Substitute(ast.NodeTransformer):
    def __init__(self, names: dict, x: str, x_name: str, target=None) -> None:
        self.names, self.x, self.x_name, self.target = names, x, x_name, target

    def visit(self, node):
        if id(node) in self.names:
            return ast.Name(self.names[id(node)], ast.Load())
        if isinstance(node, ast.Name) and node.id == self.target:
            return ast.Name("t", ast.Load())
        if isinstance(node, ast.Name) and node.id == self.x:
            return ast.Name(self.x_name, ast.Load())
        return self.generic_visit(node)


def _fallback(idiom: _Idiom, names: dict, x_name: str) -> list[str]:
    """The idiom as written, its parts replaced by the site's parameters."""
    memo = {}
    node = copy.deepcopy(idiom.node, memo)
    after = None if idiom.after is None else copy.deepcopy(idiom.after, memo)
    copies = {id(memo[id(p.node)]): names[id(p.node)] for p in _site_parts(idiom)}
    # Every occurrence of x, not only the one taken as a parameter.
    copies.update((id(memo[id(p.node)]), x_name) for p in idiom.parts if p.role == "x")
    value = _Substitute(copies, idiom.x.id, x_name).visit(node)
    if after is None:
        return [f"return {ast.unparse(value)}"]
    after = _Substitute(copies, None, x_name, idiom.target).visit(after)
    if isinstance(after, ast.Expr):
        second = ast.unparse(after)
    else:  # t = relu(t), return relu(t)
        second = f"t = {ast.unparse(after.value)}"
    return [f"t = {ast.unparse(value)}", second, "return t"]


_FUTURE_FLAGS = 0
for _feature in __future__.all_feature_names:
    _FUTURE_FLAGS |= getattr(__future__, _feature).compiler_flag


def _code(source: _Source, rewritten: str, filename: str, cells, recompute: bool):
    """The code of the def in ``rewritten``, compiled as ``source.fn`` was: in
    its class (for name mangling and ``__class__``), its free variables and
    ``cells`` (names) as closure variables, with its file's ``__future__``
    flags."""
    fn = source.fn
    tree = ast.parse(rewritten)
    function = tree.body[0]
    if recompute:
        body = function.body
        docstring = []
        if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
            docstring, body = body[:1], body[1:]
        if body:
            with_statement = ast.parse(f"with {PREFIX}recompute__():\n    pass").body[0]
            for node in ast.walk(with_statement):
                if "lineno" in node._attributes:
                    node.lineno, node.end_lineno = body[0].lineno, body[-1].end_lineno
                    node.col_offset = body[0].col_offset
                    node.end_col_offset = body[-1].end_col_offset
            with_statement.body = body
            function.body = [*docstring, with_statement]
    ast.increment_lineno(tree, source.start - 1)
    free = [name for name in fn.__code__.co_freevars if name != "__class__"]
    parameters = ", ".join([*free, *cells])
    wrapper = f"def {PREFIX}outer__({parameters}):\n    pass\n"
    if source.class_name is not None:
        wrapper = (
            f"def {PREFIX}outer__({parameters}):\n    class {source.class_name}:\n        pass\n"
        )
    outer = ast.parse(wrapper).body[0]
    for node in ast.walk(outer):  # the wrapper at the def's lines
        if "lineno" in node._attributes:
            node.lineno, node.end_lineno = function.lineno, function.end_lineno
            node.col_offset = node.end_col_offset = 0
    holder = outer.body[0] if source.class_name is not None else outer
    holder.body = [function]
    module = ast.Module([outer], [])
    flags = fn.__code__.co_flags & _FUTURE_FLAGS
    try:
        compiled = compile(module, filename, "exec", flags=flags, dont_inherit=True)
        return _find_code(compiled, function)
    except (SyntaxError, ValueError) as error:
        raise _CannotCompile(f"the rewritten code does not compile: {error}") from None


def _build(source: _Source, rewritten: str, filename: str, cells: dict, recompute: bool):
    """The function ``source.fn`` with the def in ``rewritten`` for code, its
    closure cells and ``cells`` (name: value) as new ones."""
    fn = source.fn
    if recompute:
        cells[f"{PREFIX}recompute__"] = recompute_if_eager
    code = _code(source, rewritten, filename, cells, recompute)
    originals = dict(zip(fn.__code__.co_freevars, fn.__closure__ or (), strict=True))
    closure = []
    for name in code.co_freevars:
        if name in cells:
            closure.append(types.CellType(cells[name]))
        elif name in originals:
            closure.append(originals[name])
        else:
            raise _CannotCompile(f"the rewritten code needs `{name}`, which the original has not")
    new = types.FunctionType(code, fn.__globals__, fn.__name__, fn.__defaults__, tuple(closure))
    new.__kwdefaults__ = copy.copy(fn.__kwdefaults__)
    new.__qualname__, new.__module__, new.__doc__ = fn.__qualname__, fn.__module__, fn.__doc__
    new.__annotations__ = dict(fn.__annotations__)
    if hasattr(fn, "__type_params__"):
        new.__type_params__ = fn.__type_params__
    new.__dict__.update(fn.__dict__)
    new.__crelu_ext_rewritten__ = True
    return new


def _find_code(code: types.CodeType, function: ast.FunctionDef) -> types.CodeType:
    for constant in code.co_consts:
        if isinstance(constant, types.CodeType):
            if constant.co_name == function.name and constant.co_firstlineno == function.lineno:
                return constant
            try:
                return _find_code(constant, function)
            except ValueError:
                pass
    raise ValueError(f"no code object for {function.name}")


def is_rewritten(forward) -> bool:
    """Whether ``forward`` (a function or a bound method) is one fuse made."""
    function = getattr(forward, "__func__", forward)
    return getattr(function, "__crelu_ext_rewritten__", False) is True
