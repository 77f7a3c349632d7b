"""A trainer in plain NumPy: a one-hidden-layer MLP on the node's digits, trained with mini-batch
SGD. It proves the trainer protocol needs no particular framework.

The edge starts it (edge.toml [trainer]); it reads the node's data from ./data/train.csv and
./data/test.csv (features, then the label in the last column).
"""
import numpy as np

import nereid_trainer as nt


def load(split):
    rows = np.loadtxt(f"data/{split}.csv", delimiter=",", dtype=np.float64, ndmin=2)
    return rows[:, :-1].astype(np.float32), rows[:, -1].astype(np.int64)


def forward(p, x):
    h = np.maximum(x @ p["w1"].T + p["b1"], 0.0)
    logits = h @ p["w2"].T + p["b2"]
    logits = logits - logits.max(axis=1, keepdims=True)
    probs = np.exp(logits)
    probs /= probs.sum(axis=1, keepdims=True)
    return h, probs


def cross_entropy(probs, y):
    return float(-np.log(np.maximum(probs[np.arange(len(y)), y], 1e-12)).mean())


class NumpyDigits(nt.Trainer):
    name = "numpy-digits"

    def __init__(self):
        self.train_x, self.train_y = load("train")
        self.test_x, self.test_y = load("test")

    def fit(self, parameters, config):
        p = {k: v.astype(np.float32).copy() for k, v in parameters.items()}
        rng = np.random.default_rng(config.seed)
        n, loss_sum, batches, steps = len(self.train_y), 0.0, 0, 0
        for _ in range(config.epochs):
            order = rng.permutation(n)
            loss_sum, batches = 0.0, 0
            for start in range(0, n, config.batch_size):
                idx = order[start:start + config.batch_size]
                x, y = self.train_x[idx], self.train_y[idx]
                h, probs = forward(p, x)
                loss_sum += cross_entropy(probs, y)
                batches += 1
                d = probs.copy()
                d[np.arange(len(y)), y] -= 1.0
                d /= len(y)
                grads = {"w2": d.T @ h, "b2": d.sum(axis=0)}
                dh = (d @ p["w2"]) * (h > 0)
                grads["w1"] = dh.T @ x
                grads["b1"] = dh.sum(axis=0)
                grads = {k: g.astype(np.float32) for k, g in grads.items()}
                if config.objective is not None:
                    grads = config.objective.adjust(p, grads)
                for k in p:
                    p[k] -= np.float32(config.learning_rate) * grads[k]
                steps += 1
        return p, n, {"loss": loss_sum / max(batches, 1), "steps": steps}

    def evaluate(self, parameters, config):
        _, probs = forward(parameters, self.test_x)
        accuracy = float((probs.argmax(axis=1) == self.test_y).mean())
        return cross_entropy(probs, self.test_y), len(self.test_y), {"accuracy": accuracy}


if __name__ == "__main__":
    nt.run(NumpyDigits())
