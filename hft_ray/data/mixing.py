"""Training sets made of several domains: replay of earlier stages, balanced pretraining mixes."""

from __future__ import annotations

import random
from collections.abc import Sequence

from hft_ray.data.domains import Example


def mix_replay(current: Sequence[Example], earlier: Sequence[Sequence[Example]], fraction: float,
               seed: int) -> list[Example]:
    """`current` plus replayed examples from `earlier` domains, so that replayed examples make up
    `fraction` of the result (rounded to whole examples), drawn evenly across the earlier domains
    and deterministically from `seed`."""
    pools = [list(part) for part in earlier if part]
    if not fraction or not pools:
        return list(current)
    wanted = round(len(current) * fraction / (1 - fraction))
    rng = random.Random(seed)
    replayed = [rng.choice(pools[i % len(pools)]) for i in range(wanted)]
    return list(current) + replayed


def mix_balanced(parts: Sequence[Sequence[Example]]) -> list[Example]:
    """One training set from several domains, each repeated up to the largest one's size, so
    a small domain (150 facts) is not drowned by a large one (2,000 skill examples)."""
    size = max(len(part) for part in parts)
    return [part[i % len(part)] for part in parts if part for i in range(size)]
