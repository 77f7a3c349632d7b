// {{name}}: a router (joint inference, edge, per request). As written the edge's answer stands
// when the model's top class probability reaches `threshold`; otherwise the example goes to the
// cloud. Models run through wasi-nn (`runner`). `nereid plugin build` builds it and runs the
// slot's checks.
import { maxChunk } from 'nereid:plugin/tensors@0.1.0';
import { call, configObject, field, info, invalidConfig, rejected } from '{{sdk}}';
export { runner } from '{{nn}}';

let threshold = 0.8;

export const plugin = {
  describe() {
    return info('{{name}}', '0.1.0', 'Sends an example to the cloud when the edge is unsure', [
      field('threshold', 'float', "top class probability at which the edge's answer stands, in [0, 1]", { defaultValue: 0.8 }),
    ]);
  },
  configure(config) {
    const value = configObject(config).threshold ?? 0.8;
    if (!(value >= 0 && value <= 1)) throw invalidConfig('threshold', `must be in [0, 1], got ${value}`);
    threshold = value;
  },
};

export const router = {
  decide(output) {
    const n = output.numel() < BigInt(maxChunk()) ? Number(output.numel()) : maxChunk();
    const values = call(() => output.read(0n, n));
    const score = values.length ? Math.max(...values) : NaN;
    if (!Number.isFinite(score)) throw rejected("the model's output is empty or not finite");
    return { route: score >= threshold ? 'edge' : 'cloud', score };
  },
};
