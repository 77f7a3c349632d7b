// Models through wasi-nn, for the router slot: `runner` is the slot's `runner` export (re-export
// it from the app: `export { runner } from './.nereid/nereid-nn.js'`). The plugin names a model
// the host registered; ONNX Runtime runs it natively in the host. Graphs and execution contexts
// are kept per model name for the life of the instance. Build against the `nereid:sdk` worlds
// (sdk/wit-nn), which add the wasi-nn imports to the contract's.
import { loadByName } from 'wasi:nn/graph@0.2.0-rc-2024-10-28';
import { Tensor as NnTensor } from 'wasi:nn/tensor@0.2.0-rc-2024-10-28';
import { internal, rejected } from './nereid-plugin.js';

const TO_NN = { f32: 'FP32', f64: 'FP64', u8: 'U8', i32: 'I32', i64: 'I64' };
const FROM_NN = Object.fromEntries(Object.entries(TO_NN).map(([k, v]) => [v, k]));
const loaded = new Map();

const message = (e) => (e && e.payload && typeof e.payload.data === 'function' ? e.payload.data() : String(e));

function context(model) {
  if (!loaded.has(model)) {
    let graph;
    try {
      graph = loadByName(model);
    } catch (e) {
      throw rejected(`model \`${model}\`: ${message(e)}`);
    }
    try {
      loaded.set(model, { graph, context: graph.initExecutionContext() });
    } catch (e) {
      throw internal(`model \`${model}\`: ${message(e)}`);
    }
  }
  return loaded.get(model).context;
}

/** Runs `model` on `inputs` (tensor-data records); outputs in the model's order. */
export function run(model, inputs) {
  const named = inputs.map((t) => {
    const ty = TO_NN[t.dtype];
    if (ty === undefined) throw rejected(`input \`${t.name}\`: wasi-nn has no ${t.dtype} tensors`);
    return [t.name, new NnTensor(Uint32Array.from(t.shape, Number), ty, t.data)];
  });
  let outputs;
  try {
    outputs = context(model).compute(named);
  } catch (e) {
    throw rejected(`model \`${model}\`: ${message(e)}`);
  }
  return outputs.map(([name, t]) => {
    const dtype = FROM_NN[t.ty()];
    if (dtype === undefined) throw internal(`the model returned a 16-bit float tensor \`${name}\``);
    return { name, dtype, shape: BigUint64Array.from(t.dimensions(), BigInt), data: t.data() };
  });
}

export const runner = { run };
