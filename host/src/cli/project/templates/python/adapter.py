"""{{name}}: an adapter (edge, per request): a raw payload to the model's input tensors. As
written it takes `application/octet-stream` bodies of little-endian f32 values for a model with
one f32 input, and fills the input's open dimension (the batch) from the payload's length.
`nereid plugin build` builds it and runs the slot's checks."""
import math

import nereid_plugin as sdk
from wit_world import exports
from wit_world.imports import types


class Plugin(exports.Plugin):
    def describe(self):
        return sdk.info("{{name}}", "0.1.0", "Raw little-endian f32 values to a model's input")

    def configure(self, config):
        pass


class Adapter(exports.Adapter):
    def decode(self, content_type, payload, inputs):
        if content_type != "application/octet-stream":
            raise sdk.rejected(f"expected application/octet-stream, got {content_type}")
        if len(inputs) != 1:
            raise sdk.rejected(f"the model has {len(inputs)} inputs; this adapter feeds one")
        spec = inputs[0]
        if spec.dtype != types.Dtype.F32 or len(payload) % 4 != 0:
            raise sdk.rejected("expected f32 values (a multiple of 4 bytes) for an f32 input")
        fixed = math.prod(d for d in spec.shape if d >= 0)
        values = len(payload) // 4
        open_dims = sum(1 for d in spec.shape if d < 0)
        if fixed == 0 or values % fixed != 0 or open_dims > 1 or (open_dims == 0 and values != fixed):
            raise sdk.rejected(f"{values} values do not fill input `{spec.name}`")
        shape = [d if d >= 0 else values // fixed for d in spec.shape]
        return [types.TensorData(name=spec.name, dtype=types.Dtype.F32, shape=shape, data=bytes(payload))]
