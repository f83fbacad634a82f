"""A balanced mix of several domains' examples (importance-aware HFT measures on one)."""

from __future__ import annotations

from collections.abc import Sequence

from hft_ray.data.domains import Example


def mix_balanced(parts: Sequence[Sequence[Example]]) -> list[Example]:
    """One training set from several domains, each repeated up to the largest one's size, so
    a small domain (150 facts) is not drowned by a large one (2,000 skill examples)."""
    size = max(len(part) for part in parts)
    return [part[i % len(part)] for part in parts if part for i in range(size)]
