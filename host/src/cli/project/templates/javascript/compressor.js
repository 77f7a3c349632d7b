// {{name}}: a compressor (both ends of an upload). As written it sends every f32 tensor as INT8
// with one scale per tensor (max |x| / 127, rounded to nearest): 4x fewer bytes. Its math reads
// and writes the host's tensors in chunks. `nereid plugin build` builds it and runs the slot's
// checks.
import { Tensor, maxChunk } from 'nereid:plugin/tensors@0.1.0';
import { call, info, rejected } from '{{sdk}}';

const SCALE = '.scale';

function* chunks(n) {
  const step = BigInt(maxChunk());
  for (let offset = 0n; offset < n; offset += step) {
    yield [offset, Number(n - offset < step ? n - offset : step)];
  }
}

export const plugin = {
  describe() {
    return info('{{name}}', '0.1.0', 'INT8 updates with a scale per tensor');
  },
  configure(config) {},
};

export const compressor = {
  encode(ctx, update) {
    const payload = [];
    for (const t of update) {
      if (t.value.dtype() !== 'f32') {
        payload.push(t); // sent as it is
        continue;
      }
      const n = t.value.numel();
      let maxAbs = 0;
      for (const [offset, count] of chunks(n)) {
        for (const v of call(() => t.value.readF32(offset, count))) maxAbs = Math.max(maxAbs, Math.abs(v));
      }
      const scale = maxAbs > 0 ? maxAbs / 127 : 1;
      const q = call(() => Tensor.zerosLike(t.value, 'i8'));
      for (const [offset, count] of chunks(n)) {
        const values = call(() => t.value.readF32(offset, count));
        call(() => q.write(offset, Float64Array.from(values, (v) => Math.round(v / scale))));
      }
      const s = call(() => Tensor.zeros('f64', new BigUint64Array(0)));
      call(() => s.write(0n, Float64Array.of(scale)));
      payload.push({ name: t.name + SCALE, value: s });
      payload.push({ name: t.name, value: q });
    }
    return payload;
  },
  decode(ctx, payload) {
    const scales = new Map(payload.filter((t) => t.name.endsWith(SCALE)).map((t) => [t.name.slice(0, -SCALE.length), t.value]));
    const update = [];
    for (const t of payload) {
      if (t.name.endsWith(SCALE)) continue;
      let value;
      if (t.value.dtype() === 'i8') {
        const s = scales.get(t.name);
        if (s === undefined) throw rejected(`\`${t.name}\` has no \`${SCALE}\``);
        const scale = call(() => s.read(0n, 1))[0];
        if (!(scale > 0 && Number.isFinite(scale))) throw rejected(`\`${t.name}${SCALE}\` is ${scale}`);
        value = call(() => t.value.cast('f32'));
        call(() => value.scale(scale));
      } else {
        value = call(() => t.value.duplicate());
      }
      update.push({ name: t.name, value });
    }
    return update;
  },
  rewriteModel(model, calibration) {
    throw rejected('{{name}} encodes updates; it does not rewrite models');
  },
};
