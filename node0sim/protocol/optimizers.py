"""The stage optimizers (``optim.name``) and what of their state travels to a joining peer.

- ``adamw``: ``torch.optim.AdamW`` (Node0's optimizer).
- ``nesterov_async``: ``torch.optim.NAdam`` with decoupled weight decay, as the official code of Ajanthan et al.,
  "Nesterov Method for Asynchronous Pipeline Parallel Optimization" (ICML 2025) runs it (AsyncPP ``run.bash``:
  ``--optimizer nadamw --momentum 0.99``, with ``optim/nadamw.py``).
- ``nag_delay``: the paper's explicit weight-space update (:class:`NagDelay`).

With ``optim.stage_adaptive`` the momentum and the learning rate depend on the stage's delay (the paper's
memory-efficient variant without weight stashing, section 2.3 of the reference).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from node0sim.protocol.stage_compute import OptimConfig

OPTIMIZERS = ("adamw", "nesterov_async", "nag_delay")

STAGE_MOMENTUM_RANGE = (0.9, 0.99)
"""Stage-adaptive momentum: 0.9 on the last (fresh) stage, 0.99 on the first (most delayed); paper Eq. 13."""

LR_CORRECTION_FRACTION = 7 / 50
"""Fraction of the run over which the stage learning-rate correction fades out: AsyncPP's 7 of 50 epochs."""


@dataclass(frozen=True)
class StateLayout:
    """The optimizer state of one parameter tensor, by key, besides the step count (the stage's ``updates``).

    ``tensors`` are shaped like their parameter (zeros before the first step); ``scalars`` hold one value per
    parameter tensor (one before the first step: NAdam's ``mu_product``, the running product of its momenta).
    """

    tensors: tuple[str, ...]
    scalars: tuple[str, ...] = ()
    has_step: bool = True


STATE_LAYOUTS = {
    "adamw": StateLayout(("exp_avg", "exp_avg_sq")),
    "nesterov_async": StateLayout(("exp_avg", "exp_avg_sq"), ("mu_product",)),
    "nag_delay": StateLayout(("previous",), has_step=False),
}


class NagDelay(torch.optim.Optimizer):
    """Nesterov's method in weight space with a discounted (delayed) gradient, the paper's update rule:

        d_t     = gamma (w_t - w_{t-1})
        w_{t+1} = w_t (1 - lr wd) + d_t - lr (1 - gamma) g

    ``g`` is the gradient the stage received (computed wherever its forward and backward ran, i.e. at a stale
    point when the pipeline is asynchronous); ``discount=False`` drops the (1 - gamma) factor (the paper's
    ablation, which diverges). The weight decay is decoupled as in AdamW. ``previous`` holds w_{t-1}: the
    weights at the start of the last step, the current weights before the first (no look-ahead then), so
    anything that moves the weights between steps (parameter averaging, the subspace projection) is part of
    the look-ahead, as the weight-space form defines it.
    """

    def __init__(self, params: Iterable[torch.Tensor], lr: float, gamma: float, weight_decay: float, discount: bool = True):
        super().__init__(params, {"lr": lr, "gamma": gamma, "weight_decay": weight_decay, "discount": discount})
        for group in self.param_groups:
            for param in group["params"]:
                self.state[param]["previous"] = param.detach().clone()

    @torch.no_grad()
    def step(self, closure: None = None) -> None:  # type: ignore[override]
        for group in self.param_groups:
            lr, gamma = group["lr"], group["gamma"]
            grad_scale = lr * (1 - gamma) if group["discount"] else lr
            for param in group["params"]:
                if param.grad is None:
                    continue
                previous = self.state[param]["previous"]
                look_ahead = gamma * (param - previous)
                previous.copy_(param)
                param.mul_(1 - lr * group["weight_decay"]).add_(look_ahead).add_(param.grad, alpha=-grad_scale)


def expected_delay(index: int, num_stages: int) -> int:
    """Updates between a stage's forward and its backward in a full 1F1B pipeline: S - 1 - s (AsyncPP's warm-up count).

    The stage-adaptive settings use it until the stage has measured its own delay (the server passes the mean delay
    of the backwards it has served to ``step_with``).
    """
    return num_stages - 1 - index


def stage_momentum(cfg: OptimConfig, index: int, num_stages: int, delay: float | None = None) -> float:
    """The momentum of stage ``index``: ``gamma`` (nag_delay) or ``beta1``; with ``stage_adaptive`` linear in the
    delay (``delay``, measured; None: the expected one) from 0.9 at delay 0 to 0.99 at the head's expected delay
    S - 1 (paper Eq. 13, reference section 2.3), clamped to that range.
    """
    if not cfg.stage_adaptive:
        return cfg.gamma if cfg.name == "nag_delay" else cfg.beta1
    low, high = STAGE_MOMENTUM_RANGE
    tau = expected_delay(index, num_stages) if delay is None else delay
    return low + (high - low) * min(1.0, tau / max(1, num_stages - 1))


def stage_lr_scale(cfg: OptimConfig, index: int, num_stages: int, step: int, delay: float | None = None) -> float:
    """Learning-rate multiplier of stage ``index`` at ``step``: 1, or with ``stage_adaptive`` AsyncPP's PipeMare-style
    correction ``1 / tau^(1 - min(step / T_c, 1))`` (tau: ``delay``, measured, or None: the expected one; at least 1;
    T_c 7/50 of the run, never ending without ``total_steps``).
    """
    if not cfg.stage_adaptive:
        return 1.0
    fade = min(step / (LR_CORRECTION_FRACTION * cfg.total_steps), 1.0) if cfg.total_steps else 0.0
    tau = expected_delay(index, num_stages) if delay is None else delay
    return max(1.0, tau) ** -(1.0 - fade)


def set_momentum(optimizer: torch.optim.Optimizer, momentum: float) -> None:
    """Set the momentum of every parameter group: ``gamma`` of :class:`NagDelay`, else Adam's ``beta1``."""
    for group in optimizer.param_groups:
        if "gamma" in group:
            group["gamma"] = momentum
        else:
            group["betas"] = (momentum, group["betas"][1])


def build_optimizer(params: list[torch.Tensor], cfg: OptimConfig, index: int, num_stages: int) -> torch.optim.Optimizer:
    """The optimizer ``cfg.name`` over ``params`` for stage ``index`` of ``num_stages``."""
    momentum = stage_momentum(cfg, index, num_stages)
    if cfg.name == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, betas=(momentum, cfg.beta2), eps=cfg.eps, weight_decay=cfg.weight_decay)
    if cfg.name == "nesterov_async":
        return torch.optim.NAdam(
            params, lr=cfg.lr, betas=(momentum, cfg.beta2), eps=cfg.eps, weight_decay=cfg.weight_decay,
            momentum_decay=cfg.momentum_decay, decoupled_weight_decay=True,
        )
    return NagDelay(params, lr=cfg.lr, gamma=momentum, weight_decay=cfg.weight_decay, discount=cfg.nag_discount)
