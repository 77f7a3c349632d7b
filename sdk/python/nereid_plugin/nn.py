"""Models through wasi-nn, for the router slot: `Runner` is the slot's `runner` export (import it
into the app module: ``from nereid_plugin.nn import Runner``). The plugin names a model the host
registered; ONNX Runtime runs it natively in the host. Graphs and execution contexts are kept per
model name for the life of the instance. Build against the `nereid:sdk` worlds (sdk/wit-nn),
which add the wasi-nn imports to the contract's."""
from componentize_py_types import Err
from wit_world import exports
from wit_world.imports import graph, tensor, types

from . import internal, rejected

_TO_NN = {
    types.Dtype.F32: tensor.TensorType.FP32,
    types.Dtype.F64: tensor.TensorType.FP64,
    types.Dtype.U8: tensor.TensorType.U8,
    types.Dtype.I32: tensor.TensorType.I32,
    types.Dtype.I64: tensor.TensorType.I64,
}
_FROM_NN = {v: k for k, v in _TO_NN.items()}
_loaded = {}


def _context(model: str):
    if model not in _loaded:
        try:
            g = graph.load_by_name(model)
        except Err as e:
            raise rejected(f"model `{model}`: {e.value.data()}")
        try:
            _loaded[model] = (g, g.init_execution_context())
        except Err as e:
            raise internal(f"model `{model}`: {e.value.data()}")
    return _loaded[model][1]


def run(model: str, inputs):
    """Runs `model` on `inputs` (a list of `types.TensorData`); outputs in the model's order."""
    named = []
    for t in inputs:
        if t.dtype not in _TO_NN:
            raise rejected(f"input `{t.name}`: wasi-nn has no i8 tensors")
        named.append((t.name, tensor.Tensor(list(t.shape), _TO_NN[t.dtype], bytes(t.data))))
    try:
        outputs = _context(model).compute(named)
    except Err as e:
        raise rejected(f"model `{model}`: {e.value.data()}")
    result = []
    for name, t in outputs:
        if t.ty() not in _FROM_NN:
            raise internal(f"the model returned a 16-bit float tensor `{name}`")
        result.append(types.TensorData(name=name, dtype=_FROM_NN[t.ty()], shape=list(t.dimensions()), data=t.data()))
    return result


class Runner(exports.Runner):
    def run(self, model, inputs):
        return run(model, inputs)
