"""Reproducible randomness for plugins, the same streams as the Rust SDK's `nereid_sdk::random`:
splitmix64 keyed by (key, counter), so the value for a counter does not depend on what was drawn
before, and a plugin restored after a restart draws what it would have drawn without one."""

MASK = (1 << 64) - 1
GOLDEN = 0x9E3779B97F4A7C15


def mix(z: int) -> int:
    """splitmix64's output function: a well-mixed 64-bit value from any input."""
    z = (z + GOLDEN) & MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
    return z ^ (z >> 31)


def uniform(key: int, counter: int) -> float:
    """A uniform number in [0, 1) for element `counter` of the stream `key`."""
    return (mix((key ^ mix(counter)) & MASK) >> 11) / float(1 << 53)


def below(key: int, counter: int, n: int) -> int:
    """A uniform integer in [0, n) from the stream (`key`, `counter`), without modulo bias."""
    k = 0
    zone = MASK - MASK % n
    while True:
        x = mix((mix((key ^ mix(counter)) & MASK) + k) & MASK)
        if x < zone:
            return x % n
        k += 1
