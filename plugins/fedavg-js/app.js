// FedAvg (McMahan et al., 2017) in JavaScript, as the Rust `fedavg` plugin: for every tensor,
// w_next = sum_k n_k * w_k / sum_k n_k, summed in f64 by the host. Built with componentize-js
// against the `aggregator-plugin` world (`cargo xtask plugins` builds it).
import { WeightedMean, info } from '../../sdk/js/nereid-plugin.js';

let fold = new WeightedMean();

export const plugin = {
  describe() {
    return info('fedavg-js', '0.1.0', 'Weighted average of client models by example count (FedAvg), in JavaScript');
  },
  configure(config) {},
};

export const aggregator = {
  beginRound(ctx, global) {
    fold = new WeightedMean(global);
  },
  accumulate(update) {
    fold.add(update);
  },
  finish() {
    return fold.finish();
  },
  clientConfig() {
    return [];
  },
};
