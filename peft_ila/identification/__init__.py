"""Identification: the ILA recipe that finds the important layers of a probe-state model (importance.py), the one
training loop every stage and fine-tune goes through (training.py), checkpoints and resume (checkpoint.py, atomic.py),
several processes (distributed.py) and the Trainer callback (callback.py). It builds on `tuner`, never on `app`."""

from .callback import ILACallback
from .importance import ILAResult, identify_important_layers

__all__ = ["ILACallback", "ILAResult", "identify_important_layers"]
