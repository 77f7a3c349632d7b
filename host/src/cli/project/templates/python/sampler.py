"""{{name}}: a sampler (a replay buffer's policy, edge, per arriving sample). As written it is
reservoir sampling (Vitter's algorithm R): every sample offered so far is held with the same
probability capacity / offered. `nereid plugin build` builds it and runs the slot's checks."""
import nereid_plugin as sdk
from nereid_plugin.random import below, mix
from wit_world import exports
from wit_world.exports import sampler

MASK = (1 << 64) - 1
state = {"capacity": 1000, "seed": 0, "held": [], "offered": 0}


class Plugin(exports.Plugin):
    def describe(self):
        return sdk.info("{{name}}", "0.1.0", "Reservoir sampling for a bounded replay buffer", [
            sdk.field("capacity", int, "samples the buffer holds, at least 1", default=1000),
            sdk.field("seed", int, "seed of the random choices", default=0),
        ])

    def configure(self, config):
        values = sdk.config_dict(config)
        capacity = int(values.get("capacity", 1000))
        if capacity < 1:
            raise sdk.invalid_config("capacity", f"must be at least 1, got {capacity}")
        state["capacity"] = capacity
        state["seed"] = int(values.get("seed", 0)) & MASK


class Sampler(exports.Sampler):
    def restore(self, held, offered):
        if len(held) > state["capacity"]:
            raise sdk.rejected(f"{len(held)} samples held, capacity {state['capacity']}")
        state["held"] = [s.id for s in held]
        state["offered"] = max(offered, len(held))

    def offer(self, sample):
        held = state["held"]
        state["offered"] += 1
        if len(held) < state["capacity"]:
            held.append(sample.id)
            return sampler.Admission_Keep(None)
        j = below(state["seed"], state["offered"], state["offered"])
        if j < state["capacity"]:
            evicted, held[j] = held[j], sample.id
            return sampler.Admission_Keep(evicted)
        return sampler.Admission_Discard()

    def draw(self, ctx, count):
        """`count` distinct held samples, uniformly (a partial Fisher-Yates shuffle)."""
        ids = list(state["held"])
        take = min(count, len(ids))
        key = mix((state["seed"] ^ mix(ctx.seed) ^ mix(ctx.round)) & MASK)
        for i in range(take):
            j = i + below(key, i, len(ids) - i)
            ids[i], ids[j] = ids[j], ids[i]
        return ids[:take]
