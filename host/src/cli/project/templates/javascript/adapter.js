// {{name}}: an adapter (edge, per request): a raw payload to the model's input tensors. As
// written it takes `application/octet-stream` bodies of little-endian f32 values for a model with
// one f32 input, and fills the input's open dimension (the batch) from the payload's length.
// `nereid plugin build` builds it and runs the slot's checks.
import { info, rejected } from '{{sdk}}';

export const plugin = {
  describe() {
    return info('{{name}}', '0.1.0', "Raw little-endian f32 values to a model's input");
  },
  configure(config) {},
};

export const adapter = {
  decode(contentType, payload, inputs) {
    if (contentType !== 'application/octet-stream') throw rejected(`expected application/octet-stream, got ${contentType}`);
    if (inputs.length !== 1) throw rejected(`the model has ${inputs.length} inputs; this adapter feeds one`);
    const spec = inputs[0];
    if (spec.dtype !== 'f32' || payload.length % 4 !== 0) {
      throw rejected('expected f32 values (a multiple of 4 bytes) for an f32 input');
    }
    const dims = Array.from(spec.shape, Number);
    const fixed = dims.filter((d) => d >= 0).reduce((a, b) => a * b, 1);
    const values = payload.length / 4;
    const open = dims.filter((d) => d < 0).length;
    if (fixed === 0 || values % fixed !== 0 || open > 1 || (open === 0 && values !== fixed)) {
      throw rejected(`${values} values do not fill input \`${spec.name}\``);
    }
    const shape = BigUint64Array.from(dims, (d) => BigInt(d >= 0 ? d : values / fixed));
    return [{ name: spec.name, dtype: 'f32', shape, data: new Uint8Array(payload) }];
  },
};
