"""A PyTorch trainer for nereid: the edge starts it (edge.toml [trainer]) and it trains the
example CNN on the node's data (./data/train.csv, ./data/test.csv: 64 features, then the label)
in federated rounds, and on the samples the edge hands over in incremental rounds.
"""
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F

import nereid_trainer as nt
import nereid_trainer.torch as ntt

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from model import DigitsCNN  # noqa: E402


def load(split):
    """The node's split, or (None, None) on an edge that only fine-tunes (no local data)."""
    if not os.path.exists(f"data/{split}.csv"):
        return None, None
    rows = np.loadtxt(f"data/{split}.csv", delimiter=",", dtype=np.float32, ndmin=2)
    return torch.from_numpy(rows[:, :-1].copy()), torch.from_numpy(rows[:, -1].astype(np.int64))


class TorchDigits(nt.Trainer):
    name = "pytorch-digits"

    def __init__(self):
        # One thread and deterministic kernels: a task run again gives the same update.
        torch.set_num_threads(1)
        torch.use_deterministic_algorithms(True)
        self.train_x, self.train_y = load("train")
        self.test_x, self.test_y = load("test")

    def fit(self, parameters, config):
        generator = ntt.seed_everything(config.seed)
        model = DigitsCNN()
        ntt.load_arrays(model, parameters)
        # An incremental round hands over its examples; a federated round trains on local data.
        if config.samples is not None:
            train_x, train_y = torch.from_numpy(config.samples.x.copy()), torch.from_numpy(config.samples.y.copy())
        elif self.train_x is not None:
            train_x, train_y = self.train_x, self.train_y
        else:
            raise nt.TaskError("this node has no data/train.csv to train on")
        if config.optimizer == "adam":
            optimizer = torch.optim.Adam(model.parameters(), lr=config.learning_rate)
        else:
            optimizer = torch.optim.SGD(model.parameters(), lr=config.learning_rate)
        n, steps, epoch_loss = len(train_y), 0, 0.0
        model.train()
        for _ in range(config.epochs):
            order = torch.randperm(n, generator=generator)
            losses = []
            for start in range(0, n, config.batch_size):
                idx = order[start:start + config.batch_size]
                optimizer.zero_grad()
                loss = F.cross_entropy(model(train_x[idx]), train_y[idx])
                loss.backward()
                ntt.apply_objective(model, config.objective)
                optimizer.step()
                losses.append(loss.item())
                steps += 1
            epoch_loss = float(np.mean(losses))
        return ntt.to_arrays(model), n, {"loss": epoch_loss, "steps": steps}

    def evaluate(self, parameters, config):
        if self.test_x is None:
            raise nt.TaskError("this node has no data/test.csv to evaluate on")
        model = DigitsCNN()
        ntt.load_arrays(model, parameters)
        model.eval()
        with torch.no_grad():
            logits = model(self.test_x)
            loss = F.cross_entropy(logits, self.test_y).item()
            accuracy = (logits.argmax(1) == self.test_y).float().mean().item()
        return loss, len(self.test_y), {"accuracy": accuracy}


if __name__ == "__main__":
    nt.run(TorchDigits())
