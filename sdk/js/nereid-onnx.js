// ONNX models as data, for splitters in JavaScript (no protobuf library runs in the component):
// the protobuf wire format read into fields and written back, and the graph work split inference
// needs: the valid cuts along the node order, their predicted latency from the host's profile,
// and the head and tail models of a cut. It follows `nereid-onnx` (Rust) and
// `nereid_plugin.onnx` (Python): a cut is the set of tensors made by the first k nodes (or fed as
// inputs) that a later node or an output still needs; the first is the cloud-only cut, the last
// the edge-only one. ONNX lists a graph's nodes in topological order, so the head of a cut is the
// first k nodes and the tail the rest. Errors are thrown as `OnnxError`.

// Field numbers of the ONNX messages read here (onnx.proto).
const MODEL_GRAPH = 7;
const GRAPH_NODE = 1, GRAPH_NAME = 2, GRAPH_INITIALIZER = 5, GRAPH_INPUT = 11, GRAPH_OUTPUT = 12, GRAPH_VALUE_INFO = 13;
const NODE_INPUT = 1, NODE_OUTPUT = 2, NODE_NAME = 3, NODE_OP_TYPE = 4;
const VALUE_NAME = 1, VALUE_TYPE = 2;
const TENSOR_NAME = 8;

export class OnnxError extends Error {}

const utf8 = new TextDecoder();
const toUtf8 = new TextEncoder();

function varint(data, at) {
  let value = 0;
  let scale = 1;
  for (let i = 0; i < 10; i++) {
    if (at >= data.length) throw new OnnxError('truncated varint');
    const b = data[at++];
    value += (b & 0x7f) * scale;
    if (b < 0x80) {
      if (!Number.isSafeInteger(value)) throw new OnnxError('a length or key past 2^53');
      return [value, at];
    }
    scale *= 128;
  }
  throw new OnnxError('overlong varint');
}

function putVarint(value, out) {
  while (value >= 0x80) {
    out.push((value % 128) | 0x80);
    value = Math.floor(value / 128);
  }
  out.push(value);
}

/** A message's fields in order, as [number, wire type, payload] (unknown ones kept as they are). */
export function fields(data) {
  const out = [];
  let at = 0;
  while (at < data.length) {
    let key;
    [key, at] = varint(data, at);
    const number = Math.floor(key / 8);
    const wire = key % 8;
    let start = at;
    if (wire === 0) {
      [, at] = varint(data, at);
    } else if (wire === 1 || wire === 5) {
      at += wire === 1 ? 8 : 4;
    } else if (wire === 2) {
      let size;
      [size, start] = varint(data, at);
      at = start + size;
    } else {
      throw new OnnxError(`unsupported wire type ${wire}`);
    }
    if (at > data.length) throw new OnnxError('truncated field');
    out.push([number, wire, data.subarray(start, at)]);
  }
  return out;
}

export function encode(message) {
  const head = [];
  const parts = [];
  let size = 0;
  for (const [number, wire, payload] of message) {
    const prefix = [];
    putVarint(number * 8 + wire, prefix);
    if (wire === 2) putVarint(payload.length, prefix);
    head.push(prefix);
    parts.push(payload);
    size += prefix.length + payload.length;
  }
  const out = new Uint8Array(size);
  let at = 0;
  parts.forEach((payload, i) => {
    out.set(head[i], at);
    at += head[i].length;
    out.set(payload, at);
    at += payload.length;
  });
  return out;
}

const strings = (message, number) => message.filter(([n, w]) => n === number && w === 2).map(([, , p]) => utf8.decode(p));
const string = (message, number) => strings(message, number).at(-1) ?? '';
const text = (number, value) => [number, 2, toUtf8.encode(value)];

class Node {
  constructor(raw, index) {
    this.message = fields(raw);
    this.inputs = strings(this.message, NODE_INPUT).filter((t) => t);
    this.outputs = strings(this.message, NODE_OUTPUT).filter((t) => t);
    this.opType = string(this.message, NODE_OP_TYPE);
    this.name = string(this.message, NODE_NAME);
    this.index = index;
  }

  encode() {
    return encode([...this.message.filter(([n]) => n !== NODE_NAME), text(NODE_NAME, this.name)]);
  }
}

/** An ONNX model: its graph's nodes (named as the host names them: unnamed or repeated names
 * become `<op_type>_<index>`), inputs, outputs, initializers and typed tensors. */
export class Model {
  constructor(data) {
    this.message = fields(data);
    const graphs = this.message.filter(([n, w]) => n === MODEL_GRAPH && w === 2);
    if (graphs.length === 0) throw new OnnxError('the model has no graph');
    this.graph = fields(graphs.at(-1)[2]);
    this.nodes = this.graph.filter(([n]) => n === GRAPH_NODE).map(([, , p], i) => new Node(p, i));
    const seen = new Set();
    for (const node of this.nodes) {
      if (!node.name || seen.has(node.name)) node.name = `${node.opType}_${node.index}`;
      seen.add(node.name);
    }
    this.initializers = new Map(
      this.graph.filter(([n]) => n === GRAPH_INITIALIZER).map(([, , p]) => [string(fields(p), TENSOR_NAME), p]),
    );
    this.values = new Map();
    this.typed = new Map();
    for (const number of [GRAPH_INPUT, GRAPH_OUTPUT, GRAPH_VALUE_INFO]) {
      const entries = [];
      for (const [n, , p] of this.graph) {
        if (n !== number) continue;
        const info = fields(p);
        const name = string(info, VALUE_NAME);
        entries.push([name, p]);
        if (info.some(([f]) => f === VALUE_TYPE) && !this.typed.has(name)) this.typed.set(name, p);
      }
      this.values.set(number, entries);
    }
    this.inputs = this.values.get(GRAPH_INPUT).map(([name]) => name).filter((name) => !this.initializers.has(name));
    this.outputs = this.values.get(GRAPH_OUTPUT).map(([name]) => name);
  }

  /** Every valid cut along the node order, as [tensors, number of nodes in its head]. */
  cuts() {
    const lastUse = new Map();
    for (const node of this.nodes) for (const t of node.inputs) lastUse.set(t, node.index);
    for (const o of this.outputs) lastUse.set(o, Infinity);
    let live = this.inputs.filter((t) => lastUse.has(t));
    const cuts = [[live.slice(), 0]];
    for (const node of this.nodes) {
      live.push(...node.outputs.filter((t) => !this.initializers.has(t)));
      live = live.filter((t) => (lastUse.get(t) ?? -1) > node.index);
      const last = cuts.at(-1)[0];
      if (last.length !== live.length || last.some((t, i) => t !== live[i])) cuts.push([live.slice(), node.index + 1]);
    }
    return cuts;
  }

  headSize(cut) {
    const found = this.cuts().find(([tensors]) => tensors.length === cut.length && tensors.every((t, i) => t === cut[i]));
    if (found === undefined) throw new OnnxError(`[${cut.join(', ')}] is not one of the model's cuts along its node order`);
    return found[1];
  }

  /** Edge compute of the head + (cut bytes up and output bytes back) / bandwidth + one round trip
   * + cloud compute of the tail, in milliseconds. */
  predict(cut, profile, bandwidthMbitS, rttMs) {
    const k = this.headSize(cut);
    const sizes = profile.tensor_bytes ?? {};
    const size = (tensors) =>
      tensors.reduce((sum, t) => {
        if (!(t in sizes)) throw new OnnxError(`the profile has no size for tensor \`${t}\``);
        return sum + sizes[t];
      }, 0);
    const ms = (times, nodes) => nodes.reduce((sum, n) => sum + (times?.[n.name] ?? 0), 0);
    const edge = ms(profile.edge_ms, this.nodes.slice(0, k));
    const upload = size(cut);
    if (k === this.nodes.length) return edge;
    const bits = (upload + size(this.outputs)) * 8;
    return edge + (bits / (Math.max(bandwidthMbitS, 1e-9) * 1e6)) * 1e3 + rttMs + ms(profile.cloud_ms, this.nodes.slice(k));
  }

  typedInfo(tensor) {
    const info = this.typed.get(tensor);
    if (info === undefined) throw new OnnxError(`tensor \`${tensor}\` has no type in the model (no value_info)`);
    return info;
  }

  submodel(suffix, nodes, inputs, outputs) {
    const reads = new Set(nodes.flatMap((n) => n.inputs));
    const made = new Set(nodes.flatMap((n) => n.outputs));
    const graph = [
      text(GRAPH_NAME, `${string(this.graph, GRAPH_NAME)}_${suffix}`),
      ...nodes.map((n) => [GRAPH_NODE, 2, n.encode()]),
      ...[...this.initializers].filter(([name]) => reads.has(name)).map(([, p]) => [GRAPH_INITIALIZER, 2, p]),
      ...inputs.map((p) => [GRAPH_INPUT, 2, p]),
      ...outputs.map((p) => [GRAPH_OUTPUT, 2, p]),
      ...this.values
        .get(GRAPH_VALUE_INFO)
        .filter(([name]) => reads.has(name) || made.has(name))
        .map(([, p]) => [GRAPH_VALUE_INFO, 2, p]),
    ];
    return encode([...this.message.filter(([n]) => n !== MODEL_GRAPH), [MODEL_GRAPH, 2, encode(graph)]]);
  }

  /** The head (edge) and tail (cloud) models of `cut`, as [head, tail]; an empty Uint8Array for
   * a half without nodes (no head for the cloud-only cut, no tail for the edge-only one). */
  partition(cut) {
    const k = this.headSize(cut);
    const headNodes = this.nodes.slice(0, k);
    const tailNodes = this.nodes.slice(k);
    const computed = cut.filter((t) => !this.inputs.includes(t));
    let head = new Uint8Array(0);
    if (computed.length && headNodes.length) {
      const reads = new Set(headNodes.flatMap((n) => n.inputs));
      const inputs = this.values
        .get(GRAPH_INPUT)
        .filter(([name]) => this.inputs.includes(name) && reads.has(name))
        .map(([, p]) => p);
      head = this.submodel('head', headNodes, inputs, computed.map((t) => this.typedInfo(t)));
    }
    let tail = new Uint8Array(0);
    if (tailNodes.length) {
      const outputs = this.values.get(GRAPH_OUTPUT).map(([, p]) => p);
      tail = this.submodel('tail', tailNodes, cut.map((t) => this.typedInfo(t)), outputs);
    }
    return [head, tail];
  }
}
