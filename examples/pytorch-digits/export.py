"""Exports trained weights to ONNX with torch.onnx.export, and reports PyTorch's own answers on a
test file to compare with: `python export.py WEIGHTS.safetensors OUT.onnx TEST.csv`.
Prints JSON: the accuracy on the test file and the logits of its first 20 rows."""
import json
import os
import sys

import numpy as np
import torch
from safetensors.numpy import load_file

import nereid_trainer.torch as ntt

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from model import DigitsCNN  # noqa: E402

weights, out, test = sys.argv[1:4]
model = DigitsCNN()
ntt.load_arrays(model, load_file(weights))
model.eval()
torch.onnx.export(
    model,
    (torch.zeros(1, 64),),
    out,
    input_names=["input"],
    output_names=["logits"],
    dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
    dynamo=False,
)
rows = np.loadtxt(test, delimiter=",", dtype=np.float32, ndmin=2)
with torch.no_grad():
    logits = model(torch.from_numpy(rows[:, :-1].copy()))
accuracy = float((logits.argmax(1).numpy() == rows[:, -1].astype(np.int64)).mean())
print(json.dumps({"accuracy": accuracy, "logits": logits[:20].tolist()}))
