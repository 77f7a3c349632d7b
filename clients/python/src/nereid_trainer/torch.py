"""PyTorch helpers: a module's state to and from the protocol's tensors, seeding, and the job's
client objective applied to a step's gradients."""
from __future__ import annotations

import random
from typing import Optional

import numpy as np
import torch

from .core import Arrays, Objective
from .errors import TaskError


def to_arrays(module: torch.nn.Module) -> Arrays:
    """The module's floating-point ``state_dict`` entries (parameters and buffers such as
    BatchNorm's running statistics) as float32 arrays, by their ``state_dict`` names. Integer
    buffers (``num_batches_tracked``) stay local: they are not averaged."""
    return {
        name: t.detach().to("cpu", torch.float32).contiguous().numpy()
        for name, t in module.state_dict().items()
        if t.is_floating_point()
    }


def load_arrays(module: torch.nn.Module, arrays: Arrays) -> None:
    """Loads ``arrays`` (names as :func:`to_arrays` gives them) into ``module``; every floating
    entry of its ``state_dict`` must be there with its shape."""
    state = module.state_dict()
    expected = {k for k, t in state.items() if t.is_floating_point()}
    missing, unknown = expected - arrays.keys(), arrays.keys() - expected
    if missing or unknown:
        raise TaskError(f"the model's tensors differ from the module's: missing {sorted(missing)[:5]}, "
                        f"unknown {sorted(unknown)[:5]}")
    loaded = {k: torch.from_numpy(np.asarray(v)).to(state[k].dtype) for k, v in arrays.items()}
    module.load_state_dict(loaded, strict=False)


def seed_everything(seed: int) -> torch.Generator:
    """Seeds Python, NumPy and PyTorch from the task's seed; returns a generator for loaders."""
    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.manual_seed(seed)
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def apply_objective(module: torch.nn.Module, objective: Optional[Objective]) -> None:
    """After ``loss.backward()``: replaces each parameter's gradient by the one the job's client
    objective gives (e.g. FedProx adds ``mu * (w - w_global)``). Does nothing without one."""
    if objective is None:
        return
    params = {n: p for n, p in module.named_parameters() if p.grad is not None}
    adjusted = objective.adjust(
        {n: p.detach().cpu().numpy() for n, p in params.items()},
        {n: p.grad.detach().cpu().numpy() for n, p in params.items()},
    )
    with torch.no_grad():
        for n, p in params.items():
            p.grad.copy_(torch.from_numpy(adjusted[n]))
