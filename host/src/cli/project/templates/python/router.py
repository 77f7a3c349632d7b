"""{{name}}: a router (joint inference, edge, per request). As written the edge's answer stands
when the model's top class probability reaches `threshold`; otherwise the example goes to the
cloud. Models run through wasi-nn (`Runner`). `nereid plugin build` builds it and runs the slot's
checks."""
import math

import nereid_plugin as sdk
from nereid_plugin.nn import Runner  # noqa: F401 (the slot's `runner` export)
from wit_world import exports
from wit_world.exports import router
from wit_world.imports import tensors

state = {"threshold": 0.8}


class Plugin(exports.Plugin):
    def describe(self):
        return sdk.info("{{name}}", "0.1.0", "Sends an example to the cloud when the edge is unsure", [
            sdk.field("threshold", float, "top class probability at which the edge's answer stands, in [0, 1]",
                      default=0.8),
        ])

    def configure(self, config):
        threshold = float(sdk.config_dict(config).get("threshold", 0.8))
        if not 0.0 <= threshold <= 1.0:
            raise sdk.invalid_config("threshold", f"must be in [0, 1], got {threshold}")
        state["threshold"] = threshold


class Router(exports.Router):
    def decide(self, output):
        values = sdk.call(output.read, 0, min(output.numel(), tensors.max_chunk()))
        score = max(values, default=math.nan)
        if not math.isfinite(score):
            raise sdk.rejected("the model's output is empty or not finite")
        route = router.Route.EDGE if score >= state["threshold"] else router.Route.CLOUD
        return router.Decision(route=route, score=score)
