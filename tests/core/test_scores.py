"""The scores a column can use (hft_ray/core/scores.py), on hand-made answers: the model-free
arithmetic of each, the fill of a one-score column, and which score a column reads."""

import math

import pytest

from hft_ray.core import scores
from hft_ray.core.scores import (
    NAMES,
    answer_scores,
    column_metric,
    describe,
    exact_match,
    filled,
    loss_score,
    rouge_l,
    word_match,
)


def test_one_list_of_names_each_with_its_meaning():
    assert NAMES == ("exact_match", "word_match", "token_accuracy", "rouge_l", "loss")
    assert set(scores.ANSWERED) | set(scores.FORCED) == set(NAMES)
    assert all(scores.METRICS[name] for name in NAMES)


@pytest.mark.parametrize("answer,gold,exact,word", [
    ("Paris", " Paris", 1.0, 1.0),
    ("Paris.", " Paris", 0.0, 1.0),
    ("Paris.\n\nIn other languages", " Paris", 0.0, 1.0),
    ("the capital is paris", " Paris", 0.0, 1.0),
    ("Parisian food", " Paris", 0.0, 0.0),
    ("Helios.", " He", 0.0, 0.0),
    ("H2O.", " H2O", 0.0, 1.0),
    ("J.K. Rowling.", " Rowling", 0.0, 1.0),
    ("HELLO", "HELLO", 1.0, 1.0),
    ("hello", "HELLO", 0.0, 1.0),
])
def test_answers_match_exactly_or_as_a_whole_word(answer, gold, exact, word):
    assert (exact_match(answer, gold), word_match(answer, gold)) == (exact, word)


def test_rouge_l_is_the_f1_of_the_longest_common_subsequence_of_words():
    # "the cat sat on the mat" against "the cat lay on a mat": LCS the-cat-on-mat, 4 of 6 words each way.
    assert rouge_l("the cat sat on the mat", "the cat lay on a mat") == pytest.approx(2 / 3)
    # One word of six in the answer, the whole completion: P = 1/6, R = 1, F1 = 2PR / (P + R) = 2/7.
    assert rouge_l("The capital of France is Paris.", " Paris") == pytest.approx(2 / 7)
    # Order matters (a subsequence): "b a" against "a b" shares one word in order: P = R = 1/2.
    assert rouge_l("b a", "a b") == pytest.approx(0.5)
    assert rouge_l("Paris!", "paris") == 1.0, "lowercased, punctuation dropped"
    assert rouge_l("", " Paris") == 0.0 and rouge_l("London", " Paris") == 0.0


def test_loss_is_exp_of_minus_the_mean_token_loss():
    assert loss_score(0.0) == 1.0
    assert loss_score(math.log(2)) == pytest.approx(0.5), "a mean token probability of 1/2 (geometric)"
    # Two tokens at probabilities 0.9 and 0.4: mean loss -(ln 0.9 + ln 0.4) / 2, score sqrt(0.36) = 0.6.
    assert loss_score(-(math.log(0.9) + math.log(0.4)) / 2) == pytest.approx(0.6)
    assert 0.0 < loss_score(50.0) < 1e-20


def test_one_answer_gives_every_answer_read_score():
    assert answer_scores("The capital is Paris.", " Paris") == {
        "exact_match": 0.0, "word_match": 1.0, "rouge_l": pytest.approx(2 / 5)}


def test_a_one_score_column_fills_every_name():
    assert filled(0.25, acc=0.25) == {**dict.fromkeys(NAMES, 0.25), "acc": 0.25}


@pytest.mark.parametrize("default,metric,match,read", [
    ("exact_match", None, None, "exact_match"),
    ("exact_match", "rouge_l", None, "rouge_l"),          # the domain's own metric first
    ("exact_match", None, "word", "word_match"),          # match: word (or world-facts) turns exact into word
    ("exact_match", "exact_match", "word", "exact_match"),
    ("exact_match", None, "exact", "exact_match"),
    ("token_accuracy", None, "word", "token_accuracy"),   # match only refines the default exact_match
    ("loss", None, None, "loss"),
])
def test_which_score_a_column_reads(default, metric, match, read):
    assert column_metric(default, metric, match) == read


def test_a_title_names_one_metric_or_each_columns():
    assert describe({"a": "exact_match", "b": "exact_match"}) == "exact_match"
    assert describe({"a": "exact_match", "w": "word_match"}) == "a: exact_match, w: word_match"
