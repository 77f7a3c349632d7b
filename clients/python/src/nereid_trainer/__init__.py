"""The trainer side of nereid's trainer protocol: train your own model for a nereid edge.

A nereid edge whose ``edge.toml`` has ``[trainer] command = [...]`` starts that program and hands
it each round's task over a local socket. With this package the program is a :class:`Trainer`
subclass and a call to :func:`run`. Weights travel as safetensors, metadata as JSON.
"""
from .core import Arrays, Config, Metrics, Objective, Samples, Trainer, run, PROTOCOL
from .errors import EdgeGone, ProtocolError, TaskError, TrainerError

__all__ = [
    "Arrays",
    "Config",
    "EdgeGone",
    "Metrics",
    "Objective",
    "PROTOCOL",
    "ProtocolError",
    "Samples",
    "TaskError",
    "Trainer",
    "TrainerError",
    "run",
]
