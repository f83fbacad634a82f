"""The scores a forgetting-matrix column can use: their names, what each means, and the arithmetic
that needs no model. The one list: the pipeline schema (`eval.metric`, `domains.<name>.metric`),
the evaluation (hft_ray/train/evaluation.py), the runner's fills and the matrices read it, so a new
score is added here. Plain Python: no torch, Ray or MLflow. Every score lies in [0, 1], higher is
better, and is deterministic (greedy answers, teacher-forced logits).
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Mapping

METRICS: dict[str, str] = {
    "exact_match": "the greedy answer equals the completion (both stripped)",
    "word_match": "the greedy answer holds the completion as a whole word, any case",
    "token_accuracy": "teacher-forced: the share of the completion's tokens that are the model's top choice",
    "rouge_l": "ROUGE-L F1 of the greedy answer against the completion (rouge-score, no stemming)",
    "loss": "exp(-mean per-token loss of the completion), teacher-forced: its geometric-mean token probability",
}
NAMES: tuple[str, ...] = tuple(METRICS)
DEFAULT = "exact_match"
ANSWERED = ("exact_match", "word_match", "rouge_l")   # read from the greedy answers
FORCED = ("token_accuracy", "loss")                   # read from one teacher-forced pass

# A built-in domain or a `match: word` domain asks for whole-word matching (hft_ray/data/domains.py).
MATCH_METRICS = {"exact": "exact_match", "word": "word_match"}


def exact_match(answer: str, completion: str) -> float:
    return float(answer.strip() == completion.strip())


def word_match(answer: str, completion: str) -> float:
    """1 when `answer` holds the completion as a whole word, any case ("The capital is Paris." for
    " Paris")."""
    gold = completion.strip()
    return float(re.search(rf"(?<!\w){re.escape(gold)}(?!\w)", answer, re.IGNORECASE) is not None)


@functools.cache
def _rouge_scorer():
    from rouge_score import rouge_scorer  # imports nltk: a few seconds, once per process

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)


def rouge_l(answer: str, completion: str) -> float:
    """ROUGE-L F1 (rouge-score's): the longest common subsequence of the lowercased alphanumeric
    words, LCS/len(answer) and LCS/len(completion) combined harmonically; 0 when either has no word."""
    return float(_rouge_scorer().score(completion.strip(), answer.strip())["rougeL"].fmeasure)


def loss_score(loss: float) -> float:
    """A mean per-token loss (nats) as a score in [0, 1]: exp(-loss), the geometric mean of the
    probabilities the model gives the completion's tokens (0 loss -> 1; ln 2 -> 0.5)."""
    return math.exp(-loss)


def answer_scores(answer: str, completion: str) -> dict[str, float]:
    """The scores read from one greedy answer, keyed by ANSWERED."""
    return {"exact_match": exact_match(answer, completion), "word_match": word_match(answer, completion),
            "rouge_l": rouge_l(answer, completion)}


def filled(score: float, **extra: float) -> dict[str, float]:
    """A column with one score of its own (a preference domain's reward accuracy, a harness task's
    metric): that score under every name, so it has a place in every matrix, and under its own."""
    return {**dict.fromkeys(NAMES, float(score)), **extra}


def column_metric(default: str = DEFAULT, metric: str | None = None, match: str | None = None) -> str:
    """The score a column's matrix reads: the domain's own `metric`; else `word_match` when
    `default` (eval.metric) is exact_match and the domain matches answers as words (its `match:
    word`, or a built-in's, e.g. world-facts); else `default`."""
    if metric is not None:
        return metric
    if default == "exact_match" and match is not None:
        return MATCH_METRICS[match]
    return default


def describe(metrics: Mapping[str, str]) -> str:
    """The metric of a matrix, for a title: "exact_match", or per column when they differ
    ("facts: exact_match, world: word_match")."""
    if len(set(metrics.values())) == 1:
        return next(iter(metrics.values()))
    return ", ".join(f"{column}: {metric}" for column, metric in metrics.items())
