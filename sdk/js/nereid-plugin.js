// Helpers for nereid plugins written in JavaScript (componentize-js), over the bindings it
// generates for the `nereid:plugin` WIT worlds: the same conveniences as the Rust SDK
// (`nereid-sdk`) and the Python one (`sdk/python`).
//
// The math runs in the host: tensors are host-owned (`Tensor` from
// `nereid:plugin/tensors@0.1.0`) and their operations (`axpy`, `scale`, `add`, ...) are native
// calls, so a JavaScript plugin orchestrates while the host computes. A plugin module exports the
// interfaces of its world (`plugin`, `aggregator`, ...) as objects and uses these helpers in them.
//
// How values cross the boundary (the jco conventions): records are objects with camelCase
// fields, enums are strings ('f32', 'weights'), u64 values are BigInt, an absent option is
// `undefined`, a variant is `{ tag, val }`, and an error result is a thrown value: throw what
// `rejected(...)` and its siblings return.
import { Tensor } from 'nereid:plugin/tensors@0.1.0';

/** The input (an update, a sample) is refused; the host goes on without it. */
export function rejected(message) {
  return { tag: 'rejected', val: message };
}

/** `configure` refuses the value of `key`. */
export function invalidConfig(key, message) {
  return { tag: 'invalid-config', val: { key, message } };
}

/** The call came at the wrong moment (e.g. `finish` before any update). */
export function badState(message) {
  return { tag: 'bad-state', val: message };
}

export function internal(message) {
  return { tag: 'internal', val: message };
}

/** Runs a host tensor operation (e.g. `call(() => t.axpy(0.5, x))`); its error becomes the
 * plugin's (internal) error, which the host reports naming the plugin. */
export function call(operation) {
  try {
    return operation();
  } catch (e) {
    const cause = e && e.payload ? `${e.payload.tag}: ${e.payload.val}` : String(e);
    throw internal(`tensor operation: ${cause}`);
  }
}

const KINDS = { boolean: 'boolean', integer: 'integer', float: 'float', text: 'text' };

/** A TOML scalar as a `config-value`: integers are given as BigInt (`3n`), floats as numbers. */
export function configValue(v) {
  if (typeof v === 'boolean') return { tag: 'boolean', val: v };
  if (typeof v === 'bigint') return { tag: 'integer', val: v };
  if (typeof v === 'number') return { tag: 'float', val: v };
  return { tag: 'text', val: String(v) };
}

/** One option of the plugin's config schema: `kind` is 'boolean', 'integer', 'float' or 'text'. */
export function field(key, kind, description, { defaultValue, required = false } = {}) {
  if (!(kind in KINDS)) throw internal(`config field \`${key}\`: unknown kind ${kind}`);
  return {
    key,
    kind,
    required,
    defaultValue: defaultValue === undefined ? undefined : configValue(defaultValue),
    description,
  };
}

/** What `describe` returns. */
export function info(name, version, description, configSchema = []) {
  return { name, version, description, configSchema };
}

/** The job's table for this plugin as an object (the host already checked keys and types);
 * integers come as BigInt. */
export function configObject(config) {
  return Object.fromEntries(config.map((e) => [e.key, e.value.val]));
}

/** One entry of a config the plugin returns (e.g. an aggregator's `clientConfig`). */
export function configEntry(key, value) {
  return { key, value: configValue(value) };
}

export function metric(name, value) {
  return { name, value: Number(value) };
}

const sameShape = (a, b) => a.length === b.length && a.every((d, i) => d === b[i]);
const shapeText = (s) => `[${Array.from(s, String).join(', ')}]`;

/** Names, element types and shapes of a model: updates of a round must agree with it. */
export class Layout {
  constructor(named) {
    this.entries = named.map((t) => ({ name: t.name, dtype: t.value.dtype(), shape: Array.from(t.value.shape()) }));
  }

  check(named) {
    const byName = new Map(named.map((t) => [t.name, t.value]));
    for (const { name, dtype, shape } of this.entries) {
      const t = byName.get(name);
      if (t === undefined) throw rejected(`tensor \`${name}\` is missing`);
      const d = t.dtype();
      const s = Array.from(t.shape());
      if (d !== dtype) throw rejected(`tensor \`${name}\` has dtype ${d}, expected ${dtype}`);
      if (!sameShape(s, shape)) throw rejected(`tensor \`${name}\` has shape ${shapeText(s)}, expected ${shapeText(shape)}`);
    }
    const known = new Set(this.entries.map((e) => e.name));
    for (const t of named) {
      if (!known.has(t.name)) throw rejected(`unexpected extra tensor \`${t.name}\``);
    }
  }

  zeros() {
    return this.entries.map(({ name, dtype, shape }) => ({
      name,
      value: call(() => Tensor.zeros(dtype, BigUint64Array.from(shape))),
    }));
  }
}

/** The fold behind FedAvg-like aggregators: sum_k w_k * x_k / sum_k w_k per tensor, summed in
 * f64 by the host, returned in the model's element types. Refuses, naming what is wrong, an
 * update with another layout, NaN or Inf, zero examples, or weights and deltas mixed; a refused
 * update leaves the fold as it was. */
export class WeightedMean {
  constructor(global) {
    this.global = global;
    this.layout = global === undefined ? undefined : new Layout(global);
    this.kind = undefined;
    this.sum = undefined;
    this.totalWeight = 0;
    this.accepted = 0;
  }

  /** Folds `update` in with weight n_k (its number of examples). */
  add(update) {
    if (update.numExamples === 0n) throw rejected('the update reports zero examples');
    this.addWeighted(update, Number(update.numExamples));
  }

  addWeighted(update, weight) {
    if (!(weight > 0 && Number.isFinite(weight))) throw rejected(`weight ${weight} is not a positive number`);
    if (this.layout !== undefined) this.layout.check(update.tensors);
    if (this.kind !== undefined && this.kind !== update.kind) {
      throw rejected(`the update is a ${update.kind} but earlier updates of this round were ${this.kind}`);
    }
    if (update.kind === 'delta' && this.global === undefined) throw rejected('a delta update needs a global model');
    for (const t of update.tensors) {
      if (!t.value.allFinite()) throw rejected(`tensor \`${t.name}\` contains NaN or Inf`);
    }
    if (update.kind === 'weights') this.global = undefined; // only deltas need it: the host may free it
    if (this.sum === undefined) {
      this.sum = update.tensors.map((t) => ({ name: t.name, value: call(() => Tensor.zerosLike(t.value, 'f64')) }));
    }
    const byName = new Map(update.tensors.map((t) => [t.name, t.value]));
    for (const acc of this.sum) call(() => acc.value.axpy(weight, byName.get(acc.name)));
    if (this.layout === undefined) this.layout = new Layout(update.tensors);
    this.kind = update.kind;
    this.totalWeight += weight;
    this.accepted += 1;
  }

  /** The weighted mean (plus the global model for deltas); metrics `accepted_updates` and
   * `total_weight`. */
  finish() {
    if (this.sum === undefined || this.layout === undefined) throw badState('no update was accepted this round');
    const mean = this.layout.zeros();
    mean.forEach((out, i) => call(() => out.value.axpy(1 / this.totalWeight, this.sum[i].value)));
    this.sum = undefined;
    if (this.kind === 'delta' && this.global !== undefined) {
      const byName = new Map(this.global.map((t) => [t.name, t.value]));
      for (const out of mean) call(() => out.value.add(byName.get(out.name)));
    }
    return {
      tensors: mean,
      metrics: [metric('accepted_updates', this.accepted), metric('total_weight', this.totalWeight)],
    };
  }
}

// Reproducible randomness, the same streams as the Rust SDK's `nereid_sdk::random` and the
// Python SDK's `nereid_plugin.random`: splitmix64 keyed by (key, counter), on BigInt (u64).
const MASK = (1n << 64n) - 1n;
const GOLDEN = 0x9e3779b97f4a7c15n;

/** splitmix64's output function: a well-mixed 64-bit value (BigInt) from any input. */
export function mix(z) {
  z = (BigInt(z) + GOLDEN) & MASK;
  z = ((z ^ (z >> 30n)) * 0xbf58476d1ce4e5b9n) & MASK;
  z = ((z ^ (z >> 27n)) * 0x94d049bb133111ebn) & MASK;
  return z ^ (z >> 31n);
}

/** A uniform number in [0, 1) for element `counter` of the stream `key`. */
export function uniform(key, counter) {
  return Number(mix((BigInt(key) ^ mix(counter)) & MASK) >> 11n) / 2 ** 53;
}

/** A uniform integer (BigInt) in [0, n) from the stream (`key`, `counter`), without modulo bias. */
export function below(key, counter, n) {
  n = BigInt(n);
  const zone = MASK - (MASK % n);
  for (let k = 0n; ; k += 1n) {
    const x = mix((mix((BigInt(key) ^ mix(counter)) & MASK) + k) & MASK);
    if (x < zone) return x % n;
  }
}
