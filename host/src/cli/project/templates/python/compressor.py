"""{{name}}: a compressor (both ends of an upload). As written it sends every f32 tensor as INT8
with one scale per tensor (max |x| / 127, rounded to nearest): 4x fewer bytes. Its math reads and
writes the host's tensors in chunks. `nereid plugin build` builds it and runs the slot's checks."""
import nereid_plugin as sdk
from wit_world import exports
from wit_world.imports import model, tensors, types

SCALE = ".scale"


def chunks(n):
    step = tensors.max_chunk()
    return ((offset, min(step, n - offset)) for offset in range(0, n, step))


class Plugin(exports.Plugin):
    def describe(self):
        return sdk.info("{{name}}", "0.1.0", "INT8 updates with a scale per tensor")

    def configure(self, config):
        pass


class Compressor(exports.Compressor):
    def encode(self, ctx, update):
        payload = []
        for t in update:
            if t.value.dtype() != types.Dtype.F32:
                payload.append(t)  # sent as it is
                continue
            n = t.value.numel()
            max_abs = 0.0
            for offset, count in chunks(n):
                max_abs = max([max_abs] + [abs(v) for v in sdk.call(t.value.read_f32, offset, count)])
            scale = max_abs / 127.0 if max_abs > 0.0 else 1.0
            q = sdk.call(tensors.Tensor.zeros_like, t.value, types.Dtype.I8)
            for offset, count in chunks(n):
                values = sdk.call(t.value.read_f32, offset, count)
                sdk.call(q.write, offset, [float(round(v / scale)) for v in values])
            s = sdk.call(tensors.Tensor.zeros, types.Dtype.F64, [])
            sdk.call(s.write, 0, [scale])
            payload.append(model.NamedTensor(name=t.name + SCALE, value=s))
            payload.append(model.NamedTensor(name=t.name, value=q))
        return payload

    def decode(self, ctx, payload):
        scales = {t.name[: -len(SCALE)]: t.value for t in payload if t.name.endswith(SCALE)}
        update = []
        for t in payload:
            if t.name.endswith(SCALE):
                continue
            if t.value.dtype() == types.Dtype.I8:
                if t.name not in scales:
                    raise sdk.rejected(f"`{t.name}` has no `{SCALE}`")
                scale = sdk.call(scales[t.name].read, 0, 1)[0]
                if not (scale > 0.0 and scale != float("inf")):
                    raise sdk.rejected(f"`{t.name}{SCALE}` is {scale}")
                value = sdk.call(t.value.cast, types.Dtype.F32)
                sdk.call(value.scale, scale)
            else:
                value = sdk.call(t.value.duplicate)
            update.append(model.NamedTensor(name=t.name, value=value))
        return update

    def rewrite_model(self, model_bytes, calibration):
        raise sdk.rejected("{{name}} encodes updates; it does not rewrite models")
