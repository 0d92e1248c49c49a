"""An FX graph's forward that calls each operator overload directly.

A graph the stacked executor runs uncompiled makes one Python call per node
on every call. FX writes each as ``torch.ops.aten.mm.default(...)``: four
attribute lookups, then ``OpOverload.__call__``, a Python frame whose whole
body is ``return self._op(*args, **kwargs)``. ``direct_forward`` writes the
same code with each overload's ``_op`` (the C++ entry point behind it) bound
as a global instead: ~1 us less per node, ~0.1 ms of an MLP step's ~100 nodes.
Nothing else in the generated code changes.
"""

from __future__ import annotations

import re
import types
from collections.abc import Callable
from typing import Any

import torch

# A call of an operator overload as FX's code generator writes it.
_OVERLOAD_CALL = re.compile(r"\btorch\.ops\.(\w+)\.(\w+)\.(\w+)\(")


def direct_forward(gm: torch.fx.GraphModule) -> Callable[..., Any]:
    """``gm.forward`` with its operator overloads called through their ``_op``.
    Anything the pattern does not resolve to an OpOverload is left as written."""
    code = gm.graph.python_code(root_module="self")
    namespace = dict(code.globals)
    names: dict[str, str] = {}

    def direct(match: re.Match[str]) -> str:
        namespace_name, op_name, overload_name = match.groups()
        try:
            op = getattr(getattr(getattr(torch.ops, namespace_name), op_name), overload_name)
        except (AttributeError, RuntimeError):
            return match.group(0)
        if type(op) is not torch._ops.OpOverload:  # a subclass may call otherwise
            return match.group(0)
        name = names.get(match.group(0))
        if name is None:
            name = names[match.group(0)] = f"_direct_op_{len(names)}"
            namespace[name] = op._op
        return name + "("

    source = _OVERLOAD_CALL.sub(direct, code.src)
    exec(compile(source, f"<torchpmap direct forward of graph {id(gm):#x}>", "exec"), namespace)
    return types.MethodType(namespace["forward"], gm)
