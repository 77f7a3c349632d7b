// {{name}}: a sampler (a replay buffer's policy, edge, per arriving sample). As written it is
// reservoir sampling (Vitter's algorithm R): every sample offered so far is held with the same
// probability capacity / offered. `nereid plugin build` builds it and runs the slot's checks.
// Sample ids and counts are u64, so BigInt.
import { below, configObject, field, info, invalidConfig, mix, rejected } from '{{sdk}}';

const MASK = (1n << 64n) - 1n;
let capacity = 1000;
let seed = 0n;
let held = [];
let offered = 0n;

export const plugin = {
  describe() {
    return info('{{name}}', '0.1.0', 'Reservoir sampling for a bounded replay buffer', [
      field('capacity', 'integer', 'samples the buffer holds, at least 1', { defaultValue: 1000n }),
      field('seed', 'integer', 'seed of the random choices', { defaultValue: 0n }),
    ]);
  },
  configure(config) {
    const values = configObject(config);
    const c = Number(values.capacity ?? 1000n);
    if (c < 1) throw invalidConfig('capacity', `must be at least 1, got ${c}`);
    capacity = c;
    seed = BigInt(values.seed ?? 0n) & MASK;
  },
};

export const sampler = {
  restore(samples, count) {
    if (samples.length > capacity) throw rejected(`${samples.length} samples held, capacity ${capacity}`);
    held = samples.map((s) => s.id);
    offered = count > BigInt(held.length) ? count : BigInt(held.length);
  },
  offer(sample) {
    offered += 1n;
    if (held.length < capacity) {
      held.push(sample.id);
      return { tag: 'keep', val: undefined };
    }
    const j = Number(below(seed, offered, offered));
    if (j < capacity) {
      const evicted = held[j];
      held[j] = sample.id;
      return { tag: 'keep', val: evicted };
    }
    return { tag: 'discard' };
  },
  // `count` distinct held samples, uniformly (a partial Fisher-Yates shuffle).
  draw(ctx, count) {
    const ids = held.slice();
    const take = Math.min(count, ids.length);
    const key = mix((seed ^ mix(ctx.seed) ^ mix(ctx.round)) & MASK);
    for (let i = 0; i < take; i++) {
      const j = i + Number(below(key, i, ids.length - i));
      [ids[i], ids[j]] = [ids[j], ids[i]];
    }
    return ids.slice(0, take);
  },
};
