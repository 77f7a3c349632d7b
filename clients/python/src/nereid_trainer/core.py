"""The trainer loop: connect to the edge, take tasks, call your ``fit`` and ``evaluate``."""
from __future__ import annotations

import math
import os
import socket
import sys
import traceback
from dataclasses import dataclass, field
from typing import Any, Dict, Mapping, Optional, Tuple

import numpy as np
from safetensors.numpy import load as _load, save as _save

from . import _wire
from .errors import EdgeGone, ProtocolError, TaskError

PROTOCOL = 1

Arrays = Dict[str, np.ndarray]
Metrics = Dict[str, float]


class Objective:
    """The job's client objective (e.g. FedProx's proximal term), run by the edge's plugin.

    Call :meth:`adjust` after each step's backward pass and train with the gradients it returns.
    """

    def __init__(self, sock: socket.socket):
        self._sock = sock
        self.calls = 0

    def adjust(self, parameters: Mapping[str, np.ndarray], gradients: Mapping[str, np.ndarray]) -> Arrays:
        """Returns the gradients adjusted by the objective, for the names in ``gradients``
        (each needs its parameter in ``parameters``; float32, the model's shapes)."""
        tensors = {}
        for name, g in gradients.items():
            if name not in parameters:
                raise ProtocolError(f"gradient {name!r} without its parameter")
            tensors[f"grad/{name}"] = np.ascontiguousarray(g)
            tensors[f"param/{name}"] = np.ascontiguousarray(parameters[name])
        _wire.write_frame(self._sock, {"type": "adjust_gradients"}, _save(tensors))
        message, payload = _wire.read_frame(self._sock)
        if message.get("type") != "gradients":
            raise ProtocolError(f"the edge answered {message.get('type')!r} to adjust_gradients")
        self.calls += 1
        return dict(_load(payload))


@dataclass(frozen=True)
class Samples:
    """The examples an incremental round trains on, handed over by the edge: the samples that
    arrived since the last round plus a draw from its replay buffer."""

    #: float32, one row per example in the model's input shape (``[n, *example_shape]``).
    x: np.ndarray
    #: int64 class labels, ``[n]``.
    y: np.ndarray
    #: How many of them are new (the rest were drawn from the replay buffer).
    new: int
    replayed: int


@dataclass(frozen=True)
class Config:
    """What a task asks: the job's ``[training]`` settings for this node and the round's seed."""

    job: str
    round: int
    node: str
    seed: int
    epochs: int
    batch_size: int
    learning_rate: float
    optimizer: str
    #: What the job's aggregator publishes to clients (e.g. FedProx's ``mu``).
    server_config: Dict[str, Any] = field(default_factory=dict)
    #: The job's client objective, or None.
    objective: Optional[Objective] = None
    #: For an incremental round (edge.toml ``[incremental] learner = "trainer"``): the examples
    #: to train on instead of local data. None in federated rounds.
    samples: Optional[Samples] = None


class Trainer:
    """Subclass it and implement :meth:`fit` and :meth:`evaluate` (in the spirit of Flower's
    ``NumPyClient``); then call :func:`run` with an instance."""

    #: Shown in the edge's log when the trainer connects.
    name: str = "nereid-trainer"

    def fit(self, parameters: Arrays, config: Config) -> Tuple[Arrays, int, Metrics]:
        """Trains the model starting from ``parameters`` (name -> float32 array, the global
        model) and returns the trained parameters (the same names, shapes and dtype), the number
        of training examples (the update's weight in the aggregate) and metrics (``loss`` is
        shown as the node's training loss). Seed everything from ``config.seed``: a task run
        again after a crash must give the same update. When ``config.samples`` is set (an
        incremental round), train on those examples."""
        raise NotImplementedError

    def evaluate(self, parameters: Arrays, config: Config) -> Tuple[float, int, Metrics]:
        """Evaluates ``parameters`` on local test data: loss, number of examples, metrics
        (``accuracy`` in [0, 1] is shown as the node's accuracy)."""
        raise NotImplementedError


def _config(task: dict, objective: Optional[Objective], samples: Optional[Samples]) -> Config:
    return Config(
        job=task["job"],
        round=task["round"],
        node=task["node"],
        seed=task["seed"],
        epochs=task["epochs"],
        batch_size=task["batch_size"],
        learning_rate=task["learning_rate"],
        optimizer=task["optimizer"],
        server_config=task.get("server_config") or {},
        objective=objective,
        samples=samples,
    )


def _metrics(what: str, metrics: Mapping[str, Any]) -> Metrics:
    out = {}
    for k, v in (metrics or {}).items():
        v = float(v)
        if not math.isfinite(v):
            raise TaskError(f"{what}[{k!r}] is {v}, not a finite number")
        out[str(k)] = v
    return out


def _evaluation(result: Tuple[float, int, Mapping[str, Any]]) -> dict:
    loss, n, metrics = result
    return {"loss": float(loss), "num_examples": int(n), "metrics": _metrics("evaluate metrics", metrics)}


def _samples(sock: socket.socket, counts: dict) -> Samples:
    message, payload = _wire.read_frame(sock)
    if message.get("type") != "samples":
        raise ProtocolError(f"the edge sent {message.get('type')!r} where the samples were due")
    tensors = _load(payload)
    x, y = tensors.get("x"), tensors.get("y")
    if x is None or y is None or len(x) != len(y) or len(y) != counts["examples"]:
        raise ProtocolError("the samples frame does not hold x and y of the announced size")
    return Samples(x=x, y=y, new=int(counts["new"]), replayed=int(counts["replayed"]))


def _handle(trainer: Trainer, sock: socket.socket, message: dict, payload: bytes) -> None:
    kind = message.get("type")
    parameters = dict(_load(payload))
    if kind == "fit":
        objective = Objective(sock) if message.get("objective") else None
        samples = _samples(sock, message["samples"]) if message.get("samples") else None
        config = _config(message["task"], objective, samples)
        evaluation = _evaluation(trainer.evaluate(parameters, config)) if message.get("evaluate_first") else None
        trained, n, metrics = trainer.fit(parameters, config)
        body = {
            "type": "fit_result",
            "num_examples": int(n),
            "metrics": _metrics("fit metrics", metrics),
        }
        if evaluation is not None:
            body["evaluation"] = evaluation
        tensors = {k: np.ascontiguousarray(v) for k, v in trained.items()}
        _wire.write_frame(sock, body, _save(tensors))
    else:
        raise ProtocolError(f"unknown task type {kind!r}")


def run(trainer: Trainer, socket_path: Optional[str] = None, token: Optional[str] = None) -> None:
    """Connects to the edge that started this process and serves its tasks until it closes the
    connection. An exception in ``fit`` or ``evaluate`` fails that task (its message goes to the
    edge) and the trainer waits for the next one."""
    socket_path = socket_path or os.environ.get("NEREID_TRAINER_SOCKET")
    token = token or os.environ.get("NEREID_TRAINER_TOKEN")
    if not socket_path or not token:
        raise SystemExit("nereid_trainer.run: NEREID_TRAINER_SOCKET and NEREID_TRAINER_TOKEN are not set "
                         "(the edge sets them when it starts the trainer from edge.toml [trainer])")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(socket_path)
    _wire.write_frame(sock, {"type": "hello", "protocol": PROTOCOL, "token": token, "name": trainer.name})
    try:
        while True:
            try:
                message, payload = _wire.read_frame(sock)
            except EdgeGone:
                return
            try:
                _handle(trainer, sock, message, payload)
            except EdgeGone:
                return
            except Exception as e:  # the task fails, the trainer goes on
                traceback.print_exc(file=sys.stderr)
                _wire.write_frame(sock, {"type": "error", "kind": type(e).__name__, "message": str(e)})
    finally:
        sock.close()
