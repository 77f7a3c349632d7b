"""A replay buffer's reservoir policy in Python (sampler slot), as the Rust `replay-buffer`
plugin's `reservoir`: Vitter's algorithm R. The first `capacity` samples are kept; the n-th
after that replaces a uniformly chosen held sample with probability capacity / n. Random choices
come from counter-keyed streams (`nereid_plugin.random`), the same as the Rust plugin's, so both
make the same decisions and a restored buffer decides as without a restart."""
import nereid_plugin as sdk
from nereid_plugin.random import below, mix
from wit_world import exports
from wit_world.exports import sampler

MASK = (1 << 64) - 1
state = {"capacity": 1000, "seed": 0, "held": [], "offered": 0}


class Plugin(exports.Plugin):
    def describe(self):
        return sdk.info("reservoir-py", "0.1.0", "Reservoir sampling for a bounded replay buffer, in Python", [
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
            raise sdk.rejected(f"the buffer holds {len(held)} samples, more than the capacity {state['capacity']}: "
                               "raise `capacity` or remove samples")
        if offered < len(held):
            raise sdk.rejected(f"{len(held)} samples held but only {offered} offered")
        state["held"] = sorted(held, key=lambda s: s.id)
        state["offered"] = offered

    def offer(self, sample):
        held = state["held"]
        if any(s.id == sample.id for s in held):
            raise sdk.rejected(f"sample {sample.id} is in the buffer already")
        state["offered"] += 1
        if len(held) < state["capacity"]:
            held.append(sample)
            return sampler.Admission_Keep(None)
        j = below(state["seed"], state["offered"], state["offered"])
        if j < state["capacity"]:
            # `held` stays in id order (a new sample has the largest id), as a restore gives it.
            evicted = held.pop(j).id
            held.append(sample)
            return sampler.Admission_Keep(evicted)
        return sampler.Admission_Discard()

    def draw(self, ctx, count):
        """`count` distinct held samples, uniformly (a partial Fisher-Yates shuffle)."""
        ids = [s.id for s in state["held"]]
        take = min(count, len(ids))
        key = state["seed"] ^ mix(ctx.seed) ^ mix((ctx.round + 1) & MASK)
        key = mix(key & MASK)
        for i in range(take):
            j = i + below(key, i, len(ids) - i)
            ids[i], ids[j] = ids[j], ids[i]
        return ids[:take]
