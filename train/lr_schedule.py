"""The learning-rate schedule of `train`: every diffusers schedule, with its warmup honoured.

diffusers' `get_scheduler` needs `num_training_steps` for every decaying schedule (linear, cosine,
cosine_with_restarts, polynomial) and silently ignores the warmup of `constant`; here the
training length is always given, and `constant` with a warmup becomes `constant_with_warmup`.
The schedule is stepped once per optimizer step (after the gradient accumulation), so its
lengths are in optimizer steps, as `--max-steps` and `--lr-warmup-steps` are.
"""
from __future__ import annotations

import logging

import torch

from ..adapter.errors import TrainingError

logger = logging.getLogger(__name__)

SCHEDULES = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial",
             "piecewise_constant")
DECAYING = ("linear", "cosine", "cosine_with_restarts", "polynomial")


def make_lr_scheduler(optimizer: torch.optim.Optimizer, name: str, *, warmup_steps: int, training_steps: int,
                      step_rules: str | None = None, num_cycles: int = 1, power: float = 1.0
                      ) -> torch.optim.lr_scheduler.LambdaLR:
    """diffusers' schedule `name` over `training_steps` optimizer steps, `warmup_steps` of them a
    linear warmup from 0; `step_rules` ("1:100,0.1:200,0.01") only for piecewise_constant."""
    from diffusers.optimization import get_scheduler

    if name not in SCHEDULES:
        raise TrainingError(f"--lr-scheduler {name!r} is not a schedule; choose one of {', '.join(SCHEDULES)}.")
    if warmup_steps < 0 or training_steps < 1:
        raise TrainingError(f"--lr-warmup-steps is {warmup_steps} and the run has {training_steps} steps; "
                            f"give a warmup of 0 or more and at least one step.")
    if name in DECAYING and warmup_steps >= training_steps:
        raise TrainingError(f"--lr-warmup-steps {warmup_steps} is not shorter than the run ({training_steps} "
                            f"steps): a {name} schedule would never decay. Lower the warmup.")
    if name == "piecewise_constant":
        if not step_rules:
            raise TrainingError("--lr-scheduler piecewise_constant needs --lr-step-rules, e.g. "
                                "'1:1000,0.1:2000,0.01' (multiplier:until-step, ..., final multiplier).")
        if warmup_steps:
            raise TrainingError("--lr-scheduler piecewise_constant has no warmup; put it in --lr-step-rules "
                                "(e.g. '0.1:100,1') and drop --lr-warmup-steps.")
    elif step_rules:
        raise TrainingError(f"--lr-step-rules is only read by --lr-scheduler piecewise_constant, not {name}.")
    if name == "constant" and warmup_steps:
        logger.info("--lr-scheduler constant with %d warmup steps: using constant_with_warmup.", warmup_steps)
        name = "constant_with_warmup"
    try:
        return get_scheduler(name, optimizer, step_rules=step_rules, num_warmup_steps=warmup_steps,
                             num_training_steps=training_steps, num_cycles=num_cycles, power=power)
    except ValueError as error:  # a malformed --lr-step-rules
        raise TrainingError(f"--lr-step-rules {step_rules!r}: {error}. Write 'multiplier:until-step,...,"
                            f"final multiplier', e.g. '1:1000,0.1:2000,0.01'.") from error
