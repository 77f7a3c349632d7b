"""Writes init.safetensors: the initial weights of the example's MLP (64 -> 32 -> 10)."""
import sys

import numpy as np
from safetensors.numpy import save_file

rng = np.random.default_rng(7)
hidden = 32
weights = {
    "w1": rng.uniform(-(6 / 64) ** 0.5, (6 / 64) ** 0.5, (hidden, 64)).astype(np.float32),
    "b1": np.zeros(hidden, np.float32),
    "w2": rng.uniform(-(6 / hidden) ** 0.5, (6 / hidden) ** 0.5, (10, hidden)).astype(np.float32),
    "b2": np.zeros(10, np.float32),
}
save_file(weights, sys.argv[1] if len(sys.argv) > 1 else "init.safetensors")
