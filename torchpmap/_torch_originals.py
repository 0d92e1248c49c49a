"""The torch function that a user's replacement of it stands in for.

A wrapper bound over a torch function (``F.relu = logged_relu``, as profiling,
logging and kernel-swapping code does) reaches every TorchFunctionMode as the
``func`` of the original's call: torch passes ``handle_torch_function`` the
function bound under its name *now*. A mode that calls the ``func`` it is given
runs the wrapper again inside the wrapper's own call, once more per active mode
(plain PyTorch does it under ``with torch.device(...)``). torchpmap runs its
replicas and captures under modes of its own (random streams, the capture's
checks), so a wrapper that changes the result (x3) gave 9, 81 or 729. Its modes
call ``original(func)`` instead: what was bound under that name when torchpmap
was imported. A function replaced before that import is not recognised (its
original is gone), unless the wrapper names it as ``__wrapped__``.
"""

from __future__ import annotations

import functools
import types
from typing import Any

import torch

# Where torch looks its functions up by name when it calls handle_torch_function
# (C++ bindings look theirs up on these modules too).
_NAMESPACES: tuple[Any, ...] = (
    torch,
    torch.Tensor,
    torch.nn.functional,
    torch.linalg,
    torch.fft,
    torch.special,
)

# (namespace index, name) -> the function bound there at import (torch.Tensor's inherited
# methods included: ``torch.Tensor.add = f`` binds f in Tensor's own dict, over TensorBase's).
_bound_at_import: dict[tuple[int, str], Any] = {}
# func -> what to call for it (itself, or the original it replaced); filled on first sight.
_resolved: dict[Any, Any] = {}


def _snapshot() -> None:
    for k, namespace in enumerate(_NAMESPACES):
        names = dir(namespace) if isinstance(namespace, type) else list(vars(namespace))
        for name in names:
            value = getattr(namespace, name, None)
            if callable(value) and not isinstance(value, type):
                _bound_at_import[(k, name)] = value


_snapshot()


def original(func: Any) -> Any:
    """``func``, or the torch function it replaced (see the module's doc)."""
    try:
        return _resolved[func]
    except KeyError:
        pass
    except TypeError:  # unhashable: not a function torch binds by name
        return func
    found = _find_original(func) if _may_replace(func) else func
    _resolved[func] = found
    return found


def _may_replace(func: Any) -> bool:
    """Whether ``func`` is a Python function from outside torch: torch's own functions,
    builtins and aten overloads reach the modes by the thousand, and are never a replacement."""
    if isinstance(func, types.FunctionType):
        return not _in_torch(func)
    return isinstance(func, functools.partial)


def _in_torch(func: types.FunctionType) -> bool:
    # By the module that defined it (its globals): functools.wraps copies __module__, so a
    # user's wrapper of F.relu says "torch.nn.functional" there.
    module = func.__globals__.get("__name__") or ""
    return module == "torch" or module.startswith("torch.")  # (not torchvision, not a user's torch_utils)


def _find_original(func: Any) -> Any:
    for k, namespace in enumerate(_NAMESPACES):
        for name, value in list(vars(namespace).items()):
            bound = _bound_at_import.get((k, name), func)
            if value is func and bound is not func:  # (bound before import: its __wrapped__, below)
                return bound
    inner = getattr(func, "__wrapped__", None)  # functools.wraps of a function replaced before import
    for _ in range(16):
        if inner is None or isinstance(inner, (types.BuiltinFunctionType, torch._ops.OpOverload)):
            return func if inner is None else inner
        if isinstance(inner, types.FunctionType) and _in_torch(inner):
            return inner
        inner = getattr(inner, "__wrapped__", None)
    return func


_NAMESPACE_NAMES = ("torch", "torch.Tensor", "torch.nn.functional", "torch.linalg", "torch.fft", "torch.special")
_bindings_of: dict[int, list[tuple[int, str]]] | None = None  # id(original) -> where it was bound at import


def replaced_in(graph: torch.fx.Graph) -> str | None:
    """The first torch function that ``graph`` (Dynamo's) calls and that a user's
    replacement now stands in for, as "torch.nn.functional.relu (by wrapped_relu)";
    None if none. FX's code calls such functions by name and make_fx's own
    TorchFunctionMode calls the name's current value: a capture would run the
    replacement inside itself (see the module's doc), where only eager code is right."""
    global _bindings_of
    if _bindings_of is None:
        found: dict[int, list[tuple[int, str]]] = {}
        for key, value in _bound_at_import.items():
            found.setdefault(id(value), []).append(key)
        _bindings_of = found
    for node in graph.nodes:
        if node.op == "call_function":
            places = _bindings_of.get(id(node.target), ())
            expected = node.target
        elif node.op == "call_method" and isinstance(node.target, str):
            places = [(1, node.target)]  # a tensor method: torch.Tensor's
            expected = _bound_at_import.get((1, node.target))
        else:
            continue
        for k, name in places:
            now = getattr(_NAMESPACES[k], name, None)
            if expected is not None and now is not expected:
                return f"{_NAMESPACE_NAMES[k]}.{name} (by {getattr(now, '__qualname__', now)!s})"
    return None
