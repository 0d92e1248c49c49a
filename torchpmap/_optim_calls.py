"""torch.optim's own update functions, called directly for SGD, Adam and AdamW.

``FunctionalOptimizer.step`` drives a real optimizer object over copies of the
parameters. Building one inside a captured function cannot be traced (Dynamo
never traces ``Optimizer.add_param_group``), so every step that built one ran
on the threads executor. For the three optimizers most steps use, this module
does what their ``step`` does without the object: the same lazily created
state, then the same functional call (``torch.optim.sgd.sgd``,
``torch.optim.adam.adam``) with the same arguments, read from a template
optimizer's resolved param group. Results are the optimizer's bit for bit
(tests compare them). Traced, Adam would compute its bias corrections from
its step-count tensor, as under ``torch.compile``, rounding otherwise than
eager: ``FunctionalOptimizer`` does not call it while Dynamo traces.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.optim.adam import adam
from torch.optim.optimizer import _get_scalar_dtype
from torch.optim.sgd import sgd

# The classes whose step this module mirrors (exactly these: a subclass may override step).
DIRECT = (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW)


def takes_direct_step(template: torch.optim.Optimizer) -> bool:
    """Whether ``step_directly`` can stand for ``template``'s class's step: one of
    DIRECT, with no fused kernel (whose state lives on the parameter's device) and
    not differentiable (whose step runs with grad mode on)."""
    group = template.param_groups[0]
    return type(template) in DIRECT and not any(group.get(k) for k in ("fused", "capturable", "differentiable"))


def step_directly(
    optimizer_class: type[torch.optim.Optimizer],
    group: dict[str, Any],
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    states: list[dict[str, Any]],
) -> None:
    """One step of ``optimizer_class`` over ``params`` in place, with ``grads``,
    ``group`` its hyperparameters and ``states`` each parameter's state (filled
    on the first step, updated in place, as the optimizer's ``self.state[p]``)."""
    if optimizer_class is torch.optim.SGD:
        _sgd(group, params, grads, states)
    else:
        _adam(group, params, grads, states)


def _sgd(
    group: dict[str, Any], params: list[torch.Tensor], grads: list[torch.Tensor], states: list[dict[str, Any]]
) -> None:
    with_momentum = group["momentum"] != 0
    buffers: list[torch.Tensor | None] = [s.get("momentum_buffer") for s in states] if with_momentum else []
    sgd(
        params,
        grads,
        buffers,
        weight_decay=group["weight_decay"],
        momentum=group["momentum"],
        lr=group["lr"],
        dampening=group["dampening"],
        nesterov=group["nesterov"],
        maximize=group["maximize"],
        has_sparse_grad=False,
        foreach=group["foreach"],
        fused=group["fused"],
    )
    if with_momentum:
        for state, buffer in zip(states, buffers):
            state["momentum_buffer"] = buffer


def _adam(
    group: dict[str, Any], params: list[torch.Tensor], grads: list[torch.Tensor], states: list[dict[str, Any]]
) -> None:
    for p, state in zip(params, states):
        if not state:  # Adam._init_group's lazy state (neither capturable nor fused)
            state["step"] = torch.tensor(0.0, dtype=_get_scalar_dtype(), device="cpu")
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if group["amsgrad"]:
                state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    beta1, beta2 = group["betas"]
    adam(
        params,
        grads,
        [s["exp_avg"] for s in states],
        [s["exp_avg_sq"] for s in states],
        [s["max_exp_avg_sq"] for s in states] if group["amsgrad"] else [],
        [s["step"] for s in states],
        amsgrad=group["amsgrad"],
        has_complex=any(torch.is_complex(p) for p in params),
        beta1=beta1,
        beta2=beta2,
        lr=group["lr"],
        weight_decay=group["weight_decay"],
        eps=group["eps"],
        maximize=group["maximize"],
        foreach=group["foreach"],
        capturable=group["capturable"],
        differentiable=group["differentiable"],
        fused=group["fused"],
        grad_scale=None,
        found_inf=None,
        decoupled_weight_decay=group["decoupled_weight_decay"],
    )
