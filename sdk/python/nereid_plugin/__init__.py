"""Helpers for nereid plugins written in Python (componentize-py), over the bindings it generates
for the `nereid:plugin` WIT worlds: the same conveniences as the Rust SDK (`nereid-sdk`).

The math runs in the host: tensors are host-owned (`wit_world.imports.tensors.Tensor`) and their
operations (`axpy`, `scale`, `add`, ...) are native calls, so a Python plugin orchestrates while
the host computes. A plugin module defines the classes componentize-py expects (`Plugin`,
`Aggregator`, ...) and uses these helpers inside them.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

from componentize_py_types import Err
from wit_world.imports import model, tensors, types

__all__ = [
    "Aggregate",
    "DTYPE_F32",
    "DTYPE_F64",
    "call",
    "config_entry",
    "Layout",
    "WeightedMean",
    "bad_state",
    "config_dict",
    "field",
    "info",
    "internal",
    "invalid_config",
    "metric",
    "rejected",
]

DTYPE_NAMES = {
    types.Dtype.F32: "f32",
    types.Dtype.F64: "f64",
    types.Dtype.I32: "i32",
    types.Dtype.I64: "i64",
    types.Dtype.U8: "u8",
    types.Dtype.I8: "i8",
}


# Errors: raise these from an exported function; the host names the plugin and the subject.
def rejected(message: str) -> Err:
    """The input (an update, a sample) is refused; the host goes on without it."""
    return Err(types.PluginError_Rejected(message))


def invalid_config(key: str, message: str) -> Err:
    """`configure` refuses the value of `key`."""
    return Err(types.PluginError_InvalidConfig(types.ConfigProblem(key=key, message=message)))


def bad_state(message: str) -> Err:
    """The call came at the wrong moment (e.g. `finish` before any update)."""
    return Err(types.PluginError_BadState(message))


def internal(message: str) -> Err:
    return Err(types.PluginError_Internal(message))


def call(operation, *args):
    """Runs a host tensor operation (e.g. ``call(t.axpy, 0.5, x)``); its error becomes the
    plugin's (internal) error, which the host reports naming the plugin."""
    try:
        return operation(*args)
    except Err as e:
        raise internal(f"tensor operation: {e.value}")


_tensor = call
DTYPE_F32 = types.Dtype.F32
DTYPE_F64 = types.Dtype.F64


# Describing and configuring.
_KINDS = {bool: types.ConfigKind.BOOLEAN, int: types.ConfigKind.INTEGER, float: types.ConfigKind.FLOAT,
          str: types.ConfigKind.TEXT}


def _value(v):
    if isinstance(v, bool):
        return types.ConfigValue_Boolean(v)
    if isinstance(v, int):
        return types.ConfigValue_Integer(v)
    if isinstance(v, float):
        return types.ConfigValue_Float(v)
    return types.ConfigValue_Text(str(v))


def field(key: str, kind: type, description: str, default=None, required: bool = False) -> types.ConfigField:
    """One option of the plugin's config schema: `kind` is bool, int, float or str."""
    return types.ConfigField(key=key, kind=_KINDS[kind], required=required,
                             default_value=None if default is None else _value(default), description=description)


def info(name: str, version: str, description: str, schema: Sequence[types.ConfigField] = ()) -> types.PluginInfo:
    """What `describe` returns."""
    return types.PluginInfo(name=name, version=version, description=description, config_schema=list(schema))


def config_dict(config: List[types.ConfigEntry]) -> Dict[str, object]:
    """The job's table for this plugin as a dict (the host already checked keys and types)."""
    return {e.key: e.value.value for e in config}


def metric(name: str, value: float) -> types.Metric:
    return types.Metric(name=name, value=float(value))


def config_entry(key: str, value) -> types.ConfigEntry:
    """One entry of a config the plugin returns (e.g. an aggregator's `client_config`)."""
    return types.ConfigEntry(key=key, value=_value(value))


def Aggregate(tensors_: List[model.NamedTensor], metrics: Sequence[types.Metric] = ()):
    """The result of an aggregator's `finish`."""
    from wit_world.exports import aggregator  # only aggregator worlds have it

    return aggregator.Aggregate(tensors=tensors_, metrics=list(metrics))


class Layout:
    """Names, element types and shapes of a model: updates of a round must agree with it."""

    def __init__(self, named: Sequence[model.NamedTensor]):
        self.entries: List[Tuple[str, types.Dtype, List[int]]] = [
            (t.name, t.value.dtype(), list(t.value.shape())) for t in named
        ]

    def check(self, named: Sequence[model.NamedTensor]) -> None:
        by_name = {t.name: t.value for t in named}
        for name, dtype, shape in self.entries:
            t = by_name.get(name)
            if t is None:
                raise rejected(f"tensor `{name}` is missing")
            d, s = t.dtype(), list(t.shape())
            if d != dtype:
                raise rejected(f"tensor `{name}` has dtype {DTYPE_NAMES[d]}, expected {DTYPE_NAMES[dtype]}")
            if s != shape:
                raise rejected(f"tensor `{name}` has shape {s}, expected {shape}")
        known = {e[0] for e in self.entries}
        for t in named:
            if t.name not in known:
                raise rejected(f"unexpected extra tensor `{t.name}`")

    def zeros(self) -> List[model.NamedTensor]:
        return [model.NamedTensor(name=n, value=_tensor(tensors.Tensor.zeros, d, s)) for n, d, s in self.entries]


class WeightedMean:
    """The fold behind FedAvg-like aggregators: sum_k w_k * x_k / sum_k w_k per tensor, summed
    in f64 by the host, returned in the model's element types. Refuses, naming what is wrong,
    an update with another layout, NaN or Inf, zero examples, or weights and deltas mixed;
    a refused update leaves the fold as it was."""

    def __init__(self, global_: Optional[List[model.NamedTensor]] = None):
        self.global_ = global_
        self.layout = Layout(global_) if global_ is not None else None
        self.kind: Optional[model.UpdateKind] = None
        self.sum: Optional[List[model.NamedTensor]] = None
        self.total_weight = 0.0
        self.accepted = 0

    def add(self, update: model.ClientUpdate) -> None:
        """Folds `update` in with weight n_k (its number of examples)."""
        if update.num_examples == 0:
            raise rejected("the update reports zero examples")
        self.add_weighted(update, float(update.num_examples))

    def add_weighted(self, update: model.ClientUpdate, weight: float) -> None:
        if not (weight > 0.0 and weight != float("inf")):
            raise rejected(f"weight {weight} is not a positive number")
        if self.layout is not None:
            self.layout.check(update.tensors)
        if self.kind is not None and self.kind != update.kind:
            raise rejected(f"the update is a {update.kind.name.lower()} but earlier updates of this round "
                           f"were {self.kind.name.lower()}")
        if update.kind == model.UpdateKind.DELTA and self.global_ is None:
            raise rejected("a delta update needs a global model")
        for t in update.tensors:
            if not t.value.all_finite():
                raise rejected(f"tensor `{t.name}` contains NaN or Inf")
        if update.kind == model.UpdateKind.WEIGHTS:
            self.global_ = None  # only deltas need it: the host may free it
        if self.sum is None:
            self.sum = [model.NamedTensor(name=t.name, value=_tensor(tensors.Tensor.zeros_like, t.value, types.Dtype.F64))
                        for t in update.tensors]
        by_name = {t.name: t.value for t in update.tensors}
        for acc in self.sum:
            _tensor(acc.value.axpy, weight, by_name[acc.name])
        if self.layout is None:
            self.layout = Layout(update.tensors)
        self.kind = update.kind
        self.total_weight += weight
        self.accepted += 1

    def finish(self):
        """The weighted mean (plus the global model for deltas); metrics `accepted_updates` and
        `total_weight`."""
        if self.sum is None or self.layout is None:
            raise bad_state("no update was accepted this round")
        mean = self.layout.zeros()
        for out, acc in zip(mean, self.sum):
            _tensor(out.value.axpy, 1.0 / self.total_weight, acc.value)
        self.sum = None
        if self.kind == model.UpdateKind.DELTA and self.global_ is not None:
            by_name = {t.name: t.value for t in self.global_}
            for out in mean:
                _tensor(out.value.add, by_name[out.name])
        return Aggregate(mean, [metric("accepted_updates", self.accepted), metric("total_weight", self.total_weight)])
