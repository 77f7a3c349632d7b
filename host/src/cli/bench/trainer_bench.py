"""The trainer `nereid bench trainer` runs: BENCH_MODE=echo returns the weights it got (the cost of
the hand-over alone); BENCH_MODE=work runs BENCH_STEPS steps of least-squares SGD on the weight
`w` (a fixed amount of real work: NumPy, or PyTorch with BENCH_FRAMEWORK=torch). With --standalone STEPS REPEAT WEIGHTS.safetensors it times the same work
without nereid and prints the seconds of each run as JSON."""
import json
import os
import sys
import time

import numpy as np


def work_torch(params, steps, seed):
    import torch

    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(seed)
    w = torch.nn.Parameter(torch.from_numpy(params["w"].copy()))
    x = torch.randn(64, w.shape[1], generator=g)
    y = torch.randn(64, w.shape[0], generator=g)
    optimizer = torch.optim.SGD([w], lr=1e-4)
    for _ in range(steps):
        optimizer.zero_grad()
        loss = ((x @ w.T - y) ** 2).mean()
        loss.backward()
        optimizer.step()
    return {**params, "w": w.detach().numpy()}


def work(params, steps, seed):
    if os.environ.get("BENCH_FRAMEWORK") == "torch":
        return work_torch(params, steps, seed)
    rng = np.random.default_rng(seed)
    w = params["w"].copy()
    x = rng.standard_normal((64, w.shape[1]), dtype=np.float32)
    y = rng.standard_normal((64, w.shape[0]), dtype=np.float32)
    for _ in range(steps):
        err = x @ w.T - y
        w -= np.float32(1e-4) * (err.T @ x) / np.float32(64)
    return {**params, "w": w}


if __name__ == "__main__" and "--standalone" in sys.argv:
    from safetensors.numpy import load_file

    steps, repeat, path = int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    params = load_file(path)
    work(params, 1, 0)
    seconds = []
    for i in range(repeat):
        t = time.perf_counter()
        work(params, steps, i + 1)
        seconds.append(time.perf_counter() - t)
    print(json.dumps(seconds))
elif __name__ == "__main__":
    import nereid_trainer as nt

    MODE, STEPS = os.environ["BENCH_MODE"], int(os.environ.get("BENCH_STEPS", "0"))

    class Bench(nt.Trainer):
        name = "bench"

        def fit(self, parameters, config):
            t = time.perf_counter()
            out = parameters if MODE == "echo" else work(parameters, STEPS, config.seed)
            return out, 1, {"fit_seconds": time.perf_counter() - t}

        def evaluate(self, parameters, config):
            return 0.0, 1, {}

    nt.run(Bench())
