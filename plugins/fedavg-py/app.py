"""FedAvg (McMahan et al., 2017) in Python, as the Rust `fedavg` plugin: for every tensor,
w_next = sum_k n_k * w_k / sum_k n_k, summed in f64 by the host. Built with componentize-py
against the `aggregator-plugin` world (`cargo xtask plugins` builds it)."""
import nereid_plugin as sdk
from wit_world import exports

fold = sdk.WeightedMean()


class Plugin(exports.Plugin):
    def describe(self):
        return sdk.info("fedavg-py", "0.1.0", "Weighted average of client models by example count (FedAvg), in Python")

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
