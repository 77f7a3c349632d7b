// {{name}}: an aggregator (cloud, once per round). As written it is FedAvg: for every tensor,
// w_next = sum_k n_k * w_k / sum_k n_k, summed in f64 by the host. Change `accumulate` and
// `finish` to aggregate your way; `nereid plugin build` builds it and runs the slot's checks.
import { WeightedMean, info } from '{{sdk}}';

let fold = new WeightedMean();

export const plugin = {
  describe() {
    return info('{{name}}', '0.1.0', 'Weighted average of client models by example count');
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
