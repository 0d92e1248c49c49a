"""While the batched graph is traced: a ``reshape``, ``flatten``, ``ravel`` or
``contiguous`` that would return a view on one executor and a copy on the other
stops the capture (the threads run the function, with a warning), and so does
an ``as_strided`` of a value laid out otherwise than on one replica.

These return a view of their input exactly when its strides allow, and an
in-place write afterwards shows through a view and not through a copy. The
stacked buffers are laid out so that elementwise ops keep each replica's
layout (``_row_layout``), but some batching rules lay their result out
otherwise than one replica's op does (``batch_norm`` in eval mode on 2-d input,
``mse_loss(reduction="none")`` of transposed rows). Dynamo's example values
carry the strides one replica's eager ops give; before each such call, the check
compares the decision those strides give with the decision the strides its
input has per replica in the batched trace give.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils._python_dispatch import _disable_current_modes


class ViewOrCopyDiffers(Exception):
    """A call whose result would be a view on one executor and a copy on the other."""


_METHODS = {"reshape", "flatten", "ravel", "contiguous", "reshape_as", "as_strided"}
_FUNCTIONS: dict[Any, str] = {
    torch.reshape: "reshape",
    torch.flatten: "flatten",
    torch.ravel: "ravel",
    torch.as_strided: "as_strided",
}


def checked(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """``gm``, or a copy of it with a check before each such call (in its
    subgraphs too, the bodies of ``torch.func`` transforms)."""
    if not any(_sensitive(node) for m in gm.modules() if isinstance(m, torch.fx.GraphModule) for node in m.graph.nodes):
        return gm
    copy = torch.fx.GraphModule(gm, _with_checks(gm.graph))
    for name, sub in gm.named_children():
        if isinstance(sub, torch.fx.GraphModule):
            setattr(copy, name, checked(sub))
    return copy


def _sensitive(node: torch.fx.Node) -> str | None:
    """The op's name when ``node`` calls one whose result is a view or a copy by the strides."""
    if node.op == "call_method" and node.target in _METHODS:
        return str(node.target)
    if node.op == "call_function":
        return _FUNCTIONS.get(node.target)
    return None


def _with_checks(graph: torch.fx.Graph) -> torch.fx.Graph:
    out = torch.fx.Graph()
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    for node in graph.nodes:
        name = _sensitive(node)
        source = node.args[0] if node.args else None
        example = source.meta.get("example_value") if isinstance(source, torch.fx.Node) else None
        if name is not None and isinstance(source, torch.fx.Node) and isinstance(example, torch.Tensor):
            args = torch.fx.map_arg(node.args[1:], lambda a: env[a])
            kwargs = torch.fx.map_arg(node.kwargs, lambda a: env[a])
            out.call_function(_check, (env[source], name, tuple(example.shape), tuple(example.stride()), args, kwargs))
        env[node] = out.node_copy(node, lambda a: env[a])
    return out


def _check(
    value: Any, name: str, shape: tuple[int, ...], stride: tuple[int, ...], args: tuple[Any, ...], kwargs: Any
) -> None:
    """Raise ViewOrCopyDiffers when ``name`` of ``value`` (one replica's view of the batched
    value) would alias otherwise than of a tensor of ``shape`` and ``stride``."""
    if not isinstance(value, torch.Tensor) or tuple(value.stride()) == stride:
        return
    if name == "as_strided":  # reads the memory in its own order: any other layout reads other elements
        raise ViewOrCopyDiffers(
            f"Tensor.as_strided of a value a batching rule lays out otherwise than one replica's op "
            f"(strides {tuple(value.stride())}, not {stride})"
        )
    if name == "reshape_as":
        name, args = "reshape", (tuple(args[0].shape),)
    if any(isinstance(a, torch.Tensor) for a in (*args, *dict(kwargs).values())):
        return
    if _aliases(tuple(value.shape), tuple(value.stride()), name, args, kwargs) != _aliases(
        shape, stride, name, args, kwargs
    ):
        raise ViewOrCopyDiffers(
            f"Tensor.{name} would return a view on one executor and a copy on the other: a batching rule "
            f"lays out its input otherwise than one replica's op (strides {tuple(value.stride())}, not {stride})"
        )


def _aliases(shape: tuple[int, ...], stride: tuple[int, ...], name: str, args: tuple[Any, ...], kwargs: Any) -> bool:
    """Whether ``name`` returns its input or a view of it, for an input of ``shape`` and ``stride``."""
    with _disable_current_modes(), torch._C._DisableFuncTorch():  # a meta tensor of our own, not traced
        t = torch.empty_strided(shape, stride, device="meta")
        out = getattr(t, name)(*args, **dict(kwargs))
    return out is t or out._base is t
