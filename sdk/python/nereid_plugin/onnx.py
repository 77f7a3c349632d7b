"""ONNX models as data, for splitters in Python (no protobuf library runs in the component): the
protobuf wire format read into fields and written back, and the graph work split inference
needs: the valid cuts along the node order, their predicted latency from the host's profile, and
the head and tail models of a cut. It follows `nereid-onnx` (Rust): a cut is the set of tensors
made by the first k nodes (or fed as inputs) that a later node or an output still needs; the
first is the cloud-only cut, the last the edge-only one. ONNX lists a graph's nodes in
topological order, so the head of a cut is the first k nodes and the tail the rest."""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

# Field numbers of the ONNX messages read here (onnx.proto).
MODEL_GRAPH = 7
GRAPH_NODE, GRAPH_NAME, GRAPH_INITIALIZER, GRAPH_INPUT, GRAPH_OUTPUT, GRAPH_VALUE_INFO = 1, 2, 5, 11, 12, 13
NODE_INPUT, NODE_OUTPUT, NODE_NAME, NODE_OP_TYPE = 1, 2, 3, 4
VALUE_NAME, VALUE_TYPE = 1, 2
TENSOR_NAME = 8

Field = Tuple[int, int, bytes]  # (number, wire type, payload: varint bytes, raw fixed bytes or LEN content)


class OnnxError(ValueError):
    pass


def _varint(data: bytes, at: int) -> Tuple[int, int]:
    value, shift = 0, 0
    while True:
        if at >= len(data) or shift > 63:
            raise OnnxError("truncated or overlong varint")
        b = data[at]
        value |= (b & 0x7F) << shift
        at += 1
        if b < 0x80:
            return value, at
        shift += 7


def _put_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        b = value & 0x7F
        value >>= 7
        if value:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def fields(data: bytes) -> List[Field]:
    """A message's fields in order (unknown ones kept as they are)."""
    out, at = [], 0
    while at < len(data):
        key, at = _varint(data, at)
        number, wire = key >> 3, key & 7
        if wire == 0:
            start = at
            _, at = _varint(data, at)
            out.append((number, wire, data[start:at]))
        elif wire == 1 or wire == 5:
            size = 8 if wire == 1 else 4
            if at + size > len(data):
                raise OnnxError("truncated fixed-size field")
            out.append((number, wire, data[at:at + size]))
            at += size
        elif wire == 2:
            size, at = _varint(data, at)
            if at + size > len(data):
                raise OnnxError("truncated field")
            out.append((number, wire, data[at:at + size]))
            at += size
        else:
            raise OnnxError(f"unsupported wire type {wire}")
    return out


def encode(message: List[Field]) -> bytes:
    out = bytearray()
    for number, wire, payload in message:
        out += _put_varint(number << 3 | wire)
        if wire == 2:
            out += _put_varint(len(payload))
        out += payload
    return bytes(out)


def _strings(message: List[Field], number: int) -> List[str]:
    return [p.decode("utf-8", "replace") for n, w, p in message if n == number and w == 2]


def _string(message: List[Field], number: int) -> str:
    found = _strings(message, number)
    return found[-1] if found else ""


def _text(number: int, value: str) -> Field:
    return (number, 2, value.encode("utf-8"))


class Node:
    def __init__(self, raw: bytes, index: int):
        self.message = fields(raw)
        self.inputs = [t for t in _strings(self.message, NODE_INPUT) if t]
        self.outputs = [t for t in _strings(self.message, NODE_OUTPUT) if t]
        self.op_type = _string(self.message, NODE_OP_TYPE)
        self.name = _string(self.message, NODE_NAME)
        self.index = index

    def encode(self) -> bytes:
        kept = [f for f in self.message if f[0] != NODE_NAME]
        return encode(kept + [_text(NODE_NAME, self.name)])


class Model:
    """An ONNX model: its graph's nodes (named as the host names them: unnamed or repeated names
    become `<op_type>_<index>`), inputs, outputs, initializers and typed tensors."""

    def __init__(self, data: bytes):
        self.message = fields(bytes(data))
        graphs = [p for n, w, p in self.message if n == MODEL_GRAPH and w == 2]
        if not graphs:
            raise OnnxError("the model has no graph")
        self.graph = fields(graphs[-1])
        self.nodes = [Node(p, i) for i, (n, w, p) in enumerate(f for f in self.graph if f[0] == GRAPH_NODE)]
        seen = set()
        for node in self.nodes:
            if not node.name or node.name in seen:
                node.name = f"{node.op_type}_{node.index}"
            seen.add(node.name)
        self.initializers: Dict[str, bytes] = {}
        for n, w, p in self.graph:
            if n == GRAPH_INITIALIZER:
                self.initializers[_string(fields(p), TENSOR_NAME)] = p
        self.values: Dict[int, List[Tuple[str, bytes]]] = {}
        self.typed: Dict[str, bytes] = {}
        for number in (GRAPH_INPUT, GRAPH_OUTPUT, GRAPH_VALUE_INFO):
            entries = []
            for n, w, p in self.graph:
                if n == number:
                    info = fields(p)
                    name = _string(info, VALUE_NAME)
                    entries.append((name, p))
                    if any(f[0] == VALUE_TYPE for f in info):
                        self.typed.setdefault(name, p)
            self.values[number] = entries
        self.inputs = [name for name, _ in self.values[GRAPH_INPUT] if name not in self.initializers]
        self.outputs = [name for name, _ in self.values[GRAPH_OUTPUT]]

    def cuts(self) -> List[Tuple[List[str], int]]:
        """Every valid cut along the node order with the number of nodes in its head."""
        last_use: Dict[str, float] = {}
        for node in self.nodes:
            for t in node.inputs:
                last_use[t] = node.index
        for o in self.outputs:
            last_use[o] = float("inf")
        live = [t for t in self.inputs if t in last_use]
        cuts = [(list(live), 0)]
        for node in self.nodes:
            live += [t for t in node.outputs if t not in self.initializers]
            live = [t for t in live if last_use.get(t, -1) > node.index]
            if cuts[-1][0] != live:
                cuts.append((list(live), node.index + 1))
        return cuts

    def head_size(self, cut: List[str]) -> int:
        for tensors, k in self.cuts():
            if tensors == list(cut):
                return k
        raise OnnxError(f"{list(cut)} is not one of the model's cuts along its node order")

    def predict(self, cut: List[str], profile: dict, bandwidth_mbit_s: float, rtt_ms: float) -> float:
        """Edge compute of the head + (cut bytes up and output bytes back) / bandwidth + one round
        trip + cloud compute of the tail, in milliseconds."""
        k = self.head_size(cut)
        sizes = profile.get("tensor_bytes", {})

        def size(tensors):
            missing = [t for t in tensors if t not in sizes]
            if missing:
                raise OnnxError(f"the profile has no size for tensor `{missing[0]}`")
            return sum(sizes[t] for t in tensors)

        edge = sum(profile.get("edge_ms", {}).get(n.name, 0.0) for n in self.nodes[:k])
        cloud = sum(profile.get("cloud_ms", {}).get(n.name, 0.0) for n in self.nodes[k:])
        upload = size(cut)
        if k == len(self.nodes):
            return edge
        bits = (upload + size(self.outputs)) * 8.0
        return edge + bits / (max(bandwidth_mbit_s, 1e-9) * 1e6) * 1e3 + rtt_ms + cloud

    def _typed(self, tensor: str) -> bytes:
        if tensor not in self.typed:
            raise OnnxError(f"tensor `{tensor}` has no type in the model (no value_info)")
        return self.typed[tensor]

    def _submodel(self, suffix: str, nodes: List[Node], inputs: List[bytes], outputs: List[bytes]) -> bytes:
        reads = {t for n in nodes for t in n.inputs}
        made = {t for n in nodes for t in n.outputs}
        graph: List[Field] = [_text(GRAPH_NAME, _string(self.graph, GRAPH_NAME) + "_" + suffix)]
        graph += [(GRAPH_NODE, 2, n.encode()) for n in nodes]
        graph += [(GRAPH_INITIALIZER, 2, p) for name, p in self.initializers.items() if name in reads]
        graph += [(GRAPH_INPUT, 2, p) for p in inputs]
        graph += [(GRAPH_OUTPUT, 2, p) for p in outputs]
        graph += [(GRAPH_VALUE_INFO, 2, p) for name, p in self.values[GRAPH_VALUE_INFO] if name in reads or name in made]
        kept = [f for f in self.message if f[0] != MODEL_GRAPH]
        return encode(kept + [(MODEL_GRAPH, 2, encode(graph))])

    def partition(self, cut: List[str]) -> Tuple[bytes, bytes]:
        """The head (edge) and tail (cloud) models of `cut`; empty bytes for a half without nodes
        (no head for the cloud-only cut, no tail for the edge-only one)."""
        k = self.head_size(cut)
        head_nodes, tail_nodes = self.nodes[:k], self.nodes[k:]
        computed = [t for t in cut if t not in self.inputs]
        head = b""
        if computed and head_nodes:
            reads = {t for n in head_nodes for t in n.inputs}
            inputs = [p for name, p in self.values[GRAPH_INPUT] if name in self.inputs and name in reads]
            head = self._submodel("head", head_nodes, inputs, [self._typed(t) for t in computed])
        tail = b""
        if tail_nodes:
            outputs = [p for _, p in self.values[GRAPH_OUTPUT]]
            tail = self._submodel("tail", tail_nodes, [self._typed(t) for t in cut], outputs)
        return head, tail
