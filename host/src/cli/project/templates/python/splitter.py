"""{{name}}: a splitter (split inference, edge, when the link changes): where to cut one ONNX model
between edge and cloud. As written it is Neurosurgeon's rule (ASPLOS 2017): every cut along the
node order, predicted as edge compute + transfer + RTT + cloud compute from the host's profile,
best first. The graph work is `nereid_plugin.onnx`. `nereid plugin build` builds it and runs the
slot's checks."""
import json

import nereid_plugin as sdk
from nereid_plugin.nn import Runner  # noqa: F401 (the slot's `runner` export)
from nereid_plugin.onnx import Model, OnnxError
from wit_world import exports
from wit_world.exports import splitter


def model(data):
    try:
        return Model(data)
    except OnnxError as e:
        raise sdk.rejected(f"not an ONNX model: {e}")


class Plugin(exports.Plugin):
    def describe(self):
        return sdk.info("{{name}}", "0.1.0", "Cuts a model where the predicted latency is least")

    def configure(self, config):
        pass


class Splitter(exports.Splitter):
    def plan(self, model_bytes, profile, link):
        m = model(model_bytes)
        try:
            measured = json.loads(profile)
            planned = [splitter.CutPoint(tensors=cut, predicted_ms=m.predict(cut, measured, link.bandwidth_mbit_s,
                                                                           link.rtt_ms))
                       for cut, _ in m.cuts()]
        except (ValueError, OnnxError) as e:
            raise sdk.rejected(f"profile: {e}")
        return sorted(planned, key=lambda c: c.predicted_ms)

    def partition(self, model_bytes, cut):
        try:
            return model(model_bytes).partition(list(cut))
        except OnnxError as e:
            raise sdk.rejected(str(e))
