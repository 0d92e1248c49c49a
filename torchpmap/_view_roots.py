"""Where the data of a value in a traced aten graph comes from."""

from __future__ import annotations

import operator

import torch


def view_root(node: torch.fx.Node) -> torch.fx.Node:
    """The node a chain of views (ops whose output aliases their first input) starts from,
    through the items of ops that return a list of views (split, unbind, chunk)."""
    while node.op == "call_function":
        source = node.args[0] if node.target is operator.getitem and node.args else None
        if isinstance(source, torch.fx.Node) and isinstance(source.target, torch._ops.OpOverload):
            returns = source.target._schema.returns  # an item of a list of views (Tensor(a)[])
            if len(returns) == 1 and returns[0].alias_info is not None:
                node = source
                continue
        if not isinstance(node.target, torch._ops.OpOverload):
            break
        returns = node.target._schema.returns
        if not returns or returns[0].alias_info is None or not node.args or not isinstance(node.args[0], torch.fx.Node):
            break
        node = node.args[0]
    return node
