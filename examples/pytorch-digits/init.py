"""Writes the initial weights of the example CNN (seeded) as safetensors: `python init.py OUT`."""
import os
import sys

import torch
from safetensors.numpy import save_file

import nereid_trainer.torch as ntt

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from model import DigitsCNN  # noqa: E402

torch.manual_seed(0)
save_file(ntt.to_arrays(DigitsCNN()), sys.argv[1] if len(sys.argv) > 1 else "init.safetensors")
