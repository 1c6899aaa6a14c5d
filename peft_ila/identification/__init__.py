"""Identification: the ILA recipe that finds the important layers of a probe-state model (importance.py), the one
training loop every stage and fine-tune goes through (training.py), checkpoints and resume (checkpoint.py), several
processes (distributed.py), the Trainer callbacks (callback.py) and cost-aware selection (cost.py). It builds on
`tuner`, never on `app`."""

from .callback import ILACallback, LayerwiseCallback
from .cost import StepCost, measure_step_cost, within_budget
from .importance import ILAResult, identify_important_layers

__all__ = [
    "ILACallback",
    "ILAResult",
    "LayerwiseCallback",
    "StepCost",
    "identify_important_layers",
    "measure_step_cost",
    "within_budget",
]
