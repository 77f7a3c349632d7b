// {{name}}: a splitter (split inference, edge, when the link changes): where to cut one ONNX
// model between edge and cloud. As written it is Neurosurgeon's rule (ASPLOS 2017): every cut
// along the node order, predicted as edge compute + transfer + RTT + cloud compute from the
// host's profile, best first. The graph work is `nereid-onnx.js`. `nereid plugin build` builds it
// and runs the slot's checks.
import { info, rejected } from '{{sdk}}';
import { Model, OnnxError } from '{{onnx}}';
export { runner } from '{{nn}}';

function guarded(what, f) {
  try {
    return f();
  } catch (e) {
    if (e instanceof OnnxError || e instanceof SyntaxError) throw rejected(`${what}${e.message}`);
    throw e;
  }
}

export const plugin = {
  describe() {
    return info('{{name}}', '0.1.0', 'Cuts a model where the predicted latency is least');
  },
  configure(config) {},
};

export const splitter = {
  plan(bytes, profile, link) {
    const model = guarded('not an ONNX model: ', () => new Model(bytes));
    return guarded('profile: ', () => {
      const measured = JSON.parse(profile);
      const planned = model
        .cuts()
        .map(([tensors]) => ({ tensors, predictedMs: model.predict(tensors, measured, link.bandwidthMbitS, link.rttMs) }));
      return planned.sort((a, b) => a.predictedMs - b.predictedMs);
    });
  },
  partition(bytes, cut) {
    return guarded('', () => new Model(bytes).partition(Array.from(cut)));
  },
};
