// {{name}}: a client objective (edge, every training step): an extra term in the local loss.
// As written it is FedProx's proximal term mu/2 ||w - w_global||^2 (`mu` from the job, or as the
// aggregator publishes it). `nereid plugin build` builds it and runs the slot's checks.
import { call, configObject, field, info, invalidConfig, rejected } from '{{sdk}}';

let mu = 0.01;
let global = new Map();

function globalTensor(name) {
  const t = global.get(name);
  if (t === undefined) throw rejected(`tensor \`${name}\` is not in the global model`);
  return t;
}

export const plugin = {
  describe() {
    return info('{{name}}', '0.1.0', 'Proximal term mu/2 ||w - w_global||^2', [
      field('mu', 'float', 'weight of the term (>= 0)', { defaultValue: 0.01 }),
    ]);
  },
  configure(config) {
    const value = configObject(config).mu ?? 0.01;
    if (!(Number.isFinite(value) && value >= 0)) throw invalidConfig('mu', `must be a finite number >= 0, got ${value}`);
    mu = value;
  },
};

export const clientObjective = {
  beginRound(ctx, globalModel, serverConfig) {
    const server = configObject(serverConfig);
    if (server.mu !== undefined) mu = Number(server.mu);
    global = new Map(globalModel.map((t) => [t.name, t.value]));
  },
  penalty(name, weight) {
    const diff = call(() => weight.cast('f64'));
    call(() => diff.sub(globalTensor(name)));
    const norm = call(() => diff.l2Norm());
    return 0.5 * mu * norm * norm;
  },
  adjustGradient(name, weight, gradient) {
    call(() => gradient.axpy(mu, weight));
    call(() => gradient.axpy(-mu, globalTensor(name)));
  },
};
