"""`output.keep`: which stage checkpoints of a branch go once they have served (pure logic; the
pipeline's recorder and a Tune trial remove them).

A stage's checkpoint is needed until it is evaluated and the next stage, which starts from it (and
under DPO takes it as its reference, also when resumed mid-way), has written its own. Then `last`
keeps only the branch's last stage, `none` none of them; the base is never a stage's to remove.
"""

from __future__ import annotations

KEEP = ("all", "last", "none")


def releasable(trained: set[int], evaluated: set[int], stages: int, keep: str) -> list[int]:
    """The stages (1-based) whose checkpoints `keep` lets go now, of those `trained` (written) and
    `evaluated`; a caller removes each once."""
    if keep == "all":
        return []
    done = []
    for index in sorted(trained & evaluated):
        if index == stages:
            if keep == "none":
                done.append(index)
        elif index + 1 in trained:
            done.append(index)
    return done
