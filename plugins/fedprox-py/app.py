"""FedProx (Li et al., 2020) in Python, as the Rust `fedprox` plugin. One component, two slots:
the aggregator (cloud) averages like FedAvg and publishes `mu`; the client objective (edge) adds
mu/2 * ||w - w_global||^2 to the local loss, i.e. mu * (w - w_global) to each gradient. On the
edge `mu` comes from the aggregator (`server_config`), else from this plugin's configuration."""
import math

import nereid_plugin as sdk
from wit_world import exports

state = {"mu": 0.01, "fold": sdk.WeightedMean(), "global": None}


def _mu(value, key="mu"):
    mu = float(value)
    if not (math.isfinite(mu) and mu >= 0.0):
        raise sdk.invalid_config(key, f"must be a finite number >= 0, got {mu}")
    return mu


class Plugin(exports.Plugin):
    def describe(self):
        return sdk.info("fedprox-py", "0.1.0",
                        "FedAvg aggregation with a proximal term mu/2 ||w - w_global||^2 on clients, in Python",
                        [sdk.field("mu", float, "Proximal coefficient (>= 0); 0 is FedAvg", default=0.01)])

    def configure(self, config):
        state["mu"] = _mu(sdk.config_dict(config).get("mu", 0.01))


class Aggregator(exports.Aggregator):
    def begin_round(self, ctx, global_):
        state["fold"] = sdk.WeightedMean(global_)

    def accumulate(self, update):
        state["fold"].add(update)

    def finish(self):
        out = state["fold"].finish()
        out.metrics.append(sdk.metric("mu", state["mu"]))
        return out

    def client_config(self):
        return [sdk.config_entry("mu", state["mu"])]


def _global(name):
    if state["global"] is None:
        raise sdk.bad_state("begin-round was not called")
    t = state["global"].get(name)
    if t is None:
        raise sdk.rejected(f"tensor `{name}` is not in the global model")
    return t


class ClientObjective(exports.ClientObjective):
    def begin_round(self, ctx, global_, server_config):
        published = sdk.config_dict(server_config)
        if "mu" in published:
            state["mu"] = _mu(published["mu"])
        state["global"] = {t.name: t.value for t in global_}

    def penalty(self, name, weight):
        """mu/2 * ||w - w_global||^2"""
        diff = sdk.call(weight.cast, sdk.DTYPE_F64)
        sdk.call(diff.sub, _global(name))
        norm = sdk.call(diff.l2_norm)
        return 0.5 * state["mu"] * norm * norm

    def adjust_gradient(self, name, weight, gradient):
        """gradient += mu * (w - w_global)"""
        g = _global(name)
        sdk.call(gradient.axpy, state["mu"], weight)
        sdk.call(gradient.axpy, -state["mu"], g)
