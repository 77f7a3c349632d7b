"""{{name}}: an aggregator (cloud, once per round). As written it is FedAvg: for every tensor,
w_next = sum_k n_k * w_k / sum_k n_k, summed in f64 by the host. Change `accumulate` and
`finish` to aggregate your way; `nereid plugin build` builds it and runs the slot's checks."""
import nereid_plugin as sdk
from wit_world import exports

fold = sdk.WeightedMean()


class Plugin(exports.Plugin):
    def describe(self):
        return sdk.info("{{name}}", "0.1.0", "Weighted average of client models by example count")

    def configure(self, config):
        pass


class Aggregator(exports.Aggregator):
    def begin_round(self, ctx, global_):
        global fold
        fold = sdk.WeightedMean(global_)

    def accumulate(self, update):
        fold.add(update)

    def finish(self):
        return fold.finish()

    def client_config(self):
        return []
