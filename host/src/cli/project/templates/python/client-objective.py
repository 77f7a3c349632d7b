"""{{name}}: a client objective (edge, every training step): an extra term in the local loss.
As written it is FedProx's proximal term mu/2 ||w - w_global||^2 (`mu` from the job, or as the
aggregator publishes it). `nereid plugin build` builds it and runs the slot's checks."""
import nereid_plugin as sdk
from wit_world import exports

state = {"mu": 0.01, "global": {}}


class Plugin(exports.Plugin):
    def describe(self):
        return sdk.info("{{name}}", "0.1.0", "Proximal term mu/2 ||w - w_global||^2", [
            sdk.field("mu", float, "weight of the term (>= 0)", default=0.01),
        ])

    def configure(self, config):
        mu = float(sdk.config_dict(config).get("mu", 0.01))
        if not mu >= 0.0 or mu == float("inf"):
            raise sdk.invalid_config("mu", f"must be a finite number >= 0, got {mu}")
        state["mu"] = mu


def global_tensor(name):
    if name not in state["global"]:
        raise sdk.rejected(f"tensor `{name}` is not in the global model")
    return state["global"][name]


class ClientObjective(exports.ClientObjective):
    def begin_round(self, ctx, global_, server_config):
        server = sdk.config_dict(server_config)
        if "mu" in server:
            state["mu"] = float(server["mu"])
        state["global"] = {t.name: t.value for t in global_}

    def penalty(self, name, weight):
        diff = sdk.call(weight.cast, sdk.DTYPE_F64)
        sdk.call(diff.sub, global_tensor(name))
        norm = sdk.call(diff.l2_norm)
        return 0.5 * state["mu"] * norm * norm

    def adjust_gradient(self, name, weight, gradient):
        sdk.call(gradient.axpy, state["mu"], weight)
        sdk.call(gradient.axpy, -state["mu"], global_tensor(name))
