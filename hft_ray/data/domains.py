"""Built-in synthetic domains: pure Python, deterministic from a seed, short enough for a
character-level model with `train.max_length` 64.

- `facts` is knowledge: invented key -> value pairs ("F kqzv:" -> "wxyz"), learnt by heart in
  pretraining, so its eval set is its training set.
- The skill domains are per-character transductions of a fixed-length lowercase word, each
  behind its own prompt prefix ("U abcde=" -> "ABCDE"). With a fixed length, output character j
  always sits the same distance after input character j, so a tiny LLaMA learns them from
  relative positions in a few hundred steps and generalises to unseen words; reversal and
  sorting need far more (a probe: 0.005 and 0.175 exact match after 1200 steps at lr 1e-3).
  Eval words are disjoint from training words.
- The quickstart's fine-tuning regime (benchmarks/CALIBRATION.md): pretraining teaches `copy`,
  `next` and `prev` over the whole alphabet, and `primer`, the stage instructions (upper,
  caesar, atbash) on words of letters a-m only; each fine-tuning stage then teaches one of them
  on all 26 letters, a nudge of an instruction the base already follows rather than a circuit
  built from scratch, and full fine-tuning forgets part of each earlier stage, not all of it.
- `world-facts` is knowledge for real models (hft_ray/data/world_facts.py), scored by word match.
"""

from __future__ import annotations

import random
import string
from collections.abc import Callable
from dataclasses import dataclass

from hft_ray.data.world_facts import WORLD_FACTS

LETTERS = string.ascii_lowercase
WORD = 5  # letters per word of the character-map skills


@dataclass(frozen=True)
class Example:
    """One training or eval example: the model reads `prompt` and should write `completion`
    (hft-ray's plain rendering, for models without a chat template). `messages`, when set, is the
    row as chat turns ((role, content), ...) that a model with a chat template is trained and asked
    in (hft_ray/data/chat.py); its last turn is the assistant's answer, scored against `completion`.
    `all_turns`: every assistant turn is learnt (else only the last). (Defined here, the lowest
    module, and re-exported by hft_ray.data.)"""

    prompt: str
    completion: str
    messages: tuple[tuple[str, str], ...] = ()
    all_turns: bool = True

    def __post_init__(self):
        # A job's JSON brings the turns back as lists; keep them tuples (hashable, comparable).
        object.__setattr__(self, "messages", tuple((str(r), str(c)) for r, c in self.messages))


@dataclass(frozen=True)
class Preference:
    """One preference pair for DPO: for `prompt`, `chosen` is preferred over `rejected`. `chat`:
    both answers are rendered as one user turn and one assistant turn of the model's chat template."""

    prompt: str
    chosen: str
    rejected: str
    chat: bool = False


@dataclass(frozen=True)
class DomainKind:
    """A generator of examples. `generate(rng, n)` returns n distinct examples (distinct prompts).
    `is_knowledge`: eval = train (memorisation); otherwise eval is held out from train.
    `match`: how a greedy answer is scored, "exact" (equal to the completion) or "word" (holds it
    as a whole word: for real chat models, which answer in sentences). `max_size`: how many
    distinct examples the kind has at most (None: more than any run asks for)."""

    name: str
    description: str
    generate: Callable[[random.Random, int], list[Example]]
    is_knowledge: bool = False
    default_train_size: int = 2000
    match: str = "exact"
    max_size: int | None = None


def _words(rng: random.Random, n: int, length: int, alphabet: str = LETTERS) -> list[str]:
    """n distinct random words of `length` characters, in draw order."""
    seen: dict[str, None] = {}
    while len(seen) < n:
        seen.setdefault("".join(rng.choice(alphabet) for _ in range(length)), None)
    return list(seen)


def _char_map(prefix: str, length: int, mapping: Callable[[str], str], alphabet: str = LETTERS):
    def generate(rng: random.Random, n: int) -> list[Example]:
        return [Example(f"{prefix} {w}=", "".join(mapping(c) for c in w)) for w in _words(rng, n, length, alphabet)]
    return generate


def _primer(rng: random.Random, n: int) -> list[Example]:
    """The skills upper, caesar and atbash on words of the first half of the alphabet only."""
    kinds = [_char_map(p, WORD, m, LETTERS[:13]) for p, m in (("U", str.upper), ("C", _shift(3)), ("M", _mirror))]
    parts = [kind(rng, n // 3 + 1) for kind in kinds]
    return [parts[i % 3][i // 3] for i in range(n)]


def _facts(rng: random.Random, n: int) -> list[Example]:
    # A 4-letter key and ':' rather than the skills' 5 letters and '=': with the skills' own
    # format, a skill stage applies its character map to the facts' keys too and wipes every
    # fact at once (measured: benchmarks/CALIBRATION.md), which no fine-tuning method can help.
    keys = _words(rng, n, 4)
    return [Example(f"F {key}:", "".join(rng.choice(LETTERS) for _ in range(4))) for key in keys]


def _double(rng: random.Random, n: int) -> list[Example]:
    return [Example(f"D {w}=", "".join(c + c for c in w)) for w in _words(rng, n, 4)]


def _swap(rng: random.Random, n: int) -> list[Example]:
    return [Example(f"S {w}=", "".join(w[i + 1] + w[i] for i in range(0, len(w), 2))) for w in _words(rng, n, 6)]


def _arithmetic(rng: random.Random, n: int) -> list[Example]:
    seen: dict[tuple[int, int], None] = {}
    while len(seen) < n:
        seen.setdefault((rng.randrange(100), rng.randrange(100)), None)
    return [Example(f"A {a}+{b}=", str(a + b)) for a, b in seen]


def _shift(k: int) -> Callable[[str], str]:
    return lambda c: LETTERS[(LETTERS.index(c) + k) % 26]


def _mirror(c: str) -> str:
    return LETTERS[25 - LETTERS.index(c)]


def _prefer(rng: random.Random, n: int) -> list[Preference]:
    """Pairs of two candidate shifts of a word: the +1 shift preferred over the -1 shift."""
    up, down = _shift(1), _shift(-1)
    return [Preference(f"V {w}=", "".join(map(up, w)), "".join(map(down, w))) for w in _words(rng, n, 5)]


def _world_facts(rng: random.Random, n: int) -> list[Example]:
    """The first n facts SmolLM2 knows, in a fixed order (`rng` is unused). Plainly rendered, the
    answer is begun: 'user: <question>\\nassistant: <prefix>' -> ' <answer>'; in a model's chat
    template, the question is one user turn and the model answers in its own words."""
    return [Example(f"user: {question}\nassistant: {prefix}", f" {answer.split('|')[0]}",
                    (("user", question), ("assistant", f"{prefix} {answer.split('|')[0]}.")))
            for prefix, question, answer in WORLD_FACTS[:n]]


BUILTIN_DOMAINS: dict[str, DomainKind] = {
    kind.name: kind
    for kind in (
        DomainKind("facts", "invented facts 'F kqzv:' -> 'wxyz' (knowledge: eval = train)", _facts,
                   is_knowledge=True, default_train_size=150),
        DomainKind("copy", "copy a word: 'P abcde=' -> 'abcde'", _char_map("P", WORD, lambda c: c)),
        DomainKind("upper", "upper-case a word: 'U abcde=' -> 'ABCDE'", _char_map("U", WORD, str.upper)),
        DomainKind("caesar", "shift each letter by 3: 'C abcde=' -> 'defgh'", _char_map("C", WORD, _shift(3))),
        DomainKind("atbash", "mirror the alphabet: 'M abcde=' -> 'zyxwv'", _char_map("M", WORD, _mirror)),
        DomainKind("next", "the next letter: 'N abcde=' -> 'bcdef'", _char_map("N", WORD, _shift(1))),
        DomainKind("prev", "the previous letter: 'B abcde=' -> 'zabcd'", _char_map("B", WORD, _shift(-1))),
        DomainKind("primer", "upper, caesar and atbash on words of letters a-m only ('U', 'C', 'M'; for pretraining)",
                   _primer),
        DomainKind("double", "double each letter: 'D abcd=' -> 'aabbccdd'", _double),
        DomainKind("swap", "swap letter pairs: 'S abcdef=' -> 'badcfe'", _swap),
        # Carries make addition much harder than a character map; measured in benchmarks/CALIBRATION.md.
        DomainKind("prefer", "preference pairs for DPO: 'V abcde=' prefers 'bcdef' over 'zabcd'", _prefer),
        DomainKind("world-facts", f"{len(WORLD_FACTS)} facts a real model knows: "
                   "'user: What is the capital of France?\\nassistant: The capital of France is' -> ' Paris' "
                   "(knowledge, word match)",
                   _world_facts, is_knowledge=True, default_train_size=len(WORLD_FACTS), match="word",
                   max_size=len(WORLD_FACTS)),
        DomainKind("arithmetic", "2-digit addition: 'A 12+34=' -> '46' (10,000 problems in all)", _arithmetic,
                   default_train_size=2000, max_size=10_000),
    )
}
