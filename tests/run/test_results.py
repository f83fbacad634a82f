"""A run's matrices as logged (hft_ray/run/results.py), through a tracker that only records: each
column reads its own score, and the matrix of every other score is logged beside it; over seeds,
means, deviations and paired comparisons, checked against values worked out by hand."""

import json

import pytest

from hft_ray.config.spec import parse_spec
from hft_ray.core.scores import NAMES
from hft_ray.run.layout import Layout
from hft_ray.run.results import record_results, result_from_json
from hft_ray.storage import Location


class Recording:
    def __init__(self):
        self.json, self.files, self.metrics = {}, [], {}

    def log_json(self, run_id, data, path):
        self.json[path if run_id == "parent" else f"{run_id}/{path}"] = data

    def log_text(self, run_id, text, path):
        pass

    def log_file(self, run_id, path, folder):
        self.files.append(f"{folder}/{path.name}")

    def log_metrics(self, run_id, metrics):
        self.metrics.update({k if run_id == "parent" else f"{run_id}/{k}": v for k, v in metrics.items()})

    def start_seed(self, parent_id, method, seed):
        return f"{method}@{seed}"

    def finish(self, run_id):
        pass


def test_each_column_its_own_score_and_every_other_score_beside_it(tmp_path):
    spec = parse_spec({"name": "t", "model": {"source": "builtin:tiny-llama"},
                       "domains": {"a": {"source": "builtin:upper"}, "b": {"source": "builtin:caesar"}},
                       "stages": [{"domain": "a", "steps": 1}], "methods": {"fft": {"kind": "fft"}}})
    row = {c: {name: (i + 1) / 10 + (c == "b") / 100 for i, name in enumerate(NAMES)} for c in "ab"}
    tracker = Recording()
    layout = Layout(spec, {}, Location(str(tmp_path)))
    result = record_results(spec, layout, tracker, "parent", {"bases": {"": row}, "fft": {1: row}},
                            {"a": "exact_match", "b": "rouge_l"})
    assert result.matrices["fft"].scores[0] == (row["a"]["exact_match"], row["b"]["rouge_l"])
    assert tracker.json["forgetting/fft.json"]["scores"][1] == [row["a"]["exact_match"], row["b"]["rouge_l"]]
    assert set(tracker.json) == {"forgetting/fft.json", *(f"forgetting/fft.{name}.json" for name in NAMES),
                                 "result.json"}
    assert tracker.json["forgetting/fft.token_accuracy.json"]["scores"][0] == [row[c]["token_accuracy"] for c in "ab"]
    assert {"forgetting/fft.png", "forgetting/comparison.png"} <= set(tracker.files)


def _row(a: float, b: float) -> dict:
    """Every score of a column the same (an evaluation computes them all)."""
    return {"a": dict.fromkeys(NAMES, a), "b": dict.fromkeys(NAMES, b)}


def test_over_seeds_the_means_deviations_and_paired_intervals_are_those_worked_out_by_hand(tmp_path):
    """One stage on `a`, `b` held out, 3 seeds. OP (= R[1][a]): fft 0.5 0.6 0.7, hft 0.6 0.8 0.7;
    paired differences 0.1 0.2 0.0: mean 0.1, sd 0.1, t(0.975, 2) = 4.302653, half-width
    4.302653 * 0.1 / sqrt(3) = 0.248413; better in 2 seeds (a tie is not better).
    heldout_delta (= R[1][b] - 0.5): fft -0.2 x3, hft -0.1 -0.05 0.0; differences 0.1 0.15 0.2:
    mean 0.15, sd 0.05, half-width 0.124207, so the interval excludes 0; better in 3."""
    spec = parse_spec({"name": "t", "seeds": [0, 1, 2], "model": {"source": "builtin:tiny-llama"},
                       "domains": {"a": {"source": "builtin:upper"}, "b": {"source": "builtin:caesar"}},
                       "stages": [{"domain": "a", "steps": 1}],
                       "methods": {"fft": {"kind": "fft"}, "hft": {"kind": "hft"}}})
    layout = Layout(spec, {}, Location(str(tmp_path)))
    fft, hft = {0: (0.5, 0.3), 1: (0.6, 0.3), 2: (0.7, 0.3)}, {0: (0.6, 0.4), 1: (0.8, 0.45), 2: (0.7, 0.5)}
    rows = {"bases": {f"seed-{s}": _row(0.0, 0.5) for s in range(3)},
            **{f"fft@{s}": {1: _row(*fft[s])} for s in range(3)}, **{f"hft@{s}": {1: _row(*hft[s])} for s in range(3)}}
    tracker = Recording()
    out = record_results(spec, layout, tracker, "parent", rows, {"a": "exact_match", "b": "exact_match"}).to_json()

    assert out["seeds"] == [0, 1, 2] and out["compare_to"] == "fft"
    assert out["methods"]["hft"]["summary"]["OP"] == pytest.approx(0.7)
    assert out["methods"]["hft"]["summary_std"]["OP"] == pytest.approx(0.1)
    assert out["methods"]["fft"]["summary_std"]["heldout_delta"] == pytest.approx(0.0)
    assert out["methods"]["hft"]["matrix"]["scores"][1] == pytest.approx([0.7, 0.45])
    assert out["methods"]["hft"]["matrix_std"]["scores"][1] == pytest.approx([0.1, 0.05])
    assert out["methods"]["hft"]["per_seed"]["1"]["summary"]["OP"] == pytest.approx(0.8)
    op, heldout = out["comparisons"]["hft"]["OP"], out["comparisons"]["hft"]["heldout_delta"]
    assert op["diff"] == pytest.approx(0.1) and op["ci95"] == pytest.approx([0.1 - 0.248413, 0.1 + 0.248413], abs=1e-6)
    assert (op["n"], op["better"]) == (3, 2)
    assert heldout["ci95"] == pytest.approx([0.15 - 0.124207, 0.15 + 0.124207], abs=1e-6) and heldout["better"] == 3
    assert set(out["comparisons"]) == {"hft"}, "the reference is not compared with itself"

    assert tracker.metrics["hft.OP"] == pytest.approx(0.7) and tracker.metrics["hft.OP.std"] == pytest.approx(0.1)
    assert tracker.metrics["compare.hft.heldout_delta.lo"] == pytest.approx(0.025793, abs=1e-6)
    assert tracker.metrics["hft@1/OP"] == pytest.approx(0.8), "each seed's own summary in its child run"
    assert {"forgetting/hft.json", "forgetting/hft.std.json", "result.json", "hft@2/forgetting/hft.json",
            "hft@2/forgetting/hft.token_accuracy.json"} <= set(tracker.json)
    assert "forgetting/hft.token_accuracy.json" not in tracker.json, "over seeds, per seed only"
    assert json.loads((tmp_path / "result.json").read_text())["comparisons"] == out["comparisons"]
    assert result_from_json(out).to_json() == out, "hft-ray report reads back what run wrote"

    from hft_ray.cli.display import format_result

    text = format_result(result_from_json(out), "exact_match")
    assert "hft (mean±std over seeds 0, 1, 2; exact_match" in text and "0.700±0.100*" in text
    assert "OP=0.700±0.100" in text
    assert ("hft's OP is 0.100 higher than fft's (95% CI -0.148 to +0.348; better in 2 of 3 seeds): the interval "
            "includes 0: no difference shown") in text
    assert ("hft's heldout_delta is 0.150 higher than fft's (95% CI +0.026 to +0.274; better in 3 of 3 seeds): "
            "the interval excludes 0") in text


def test_one_seed_listed_gives_the_output_of_one_run(tmp_path):
    spec = parse_spec({"name": "t", "seeds": [3], "model": {"source": "builtin:tiny-llama"},
                       "domains": {"a": {"source": "builtin:upper"}}, "stages": [{"domain": "a", "steps": 1}],
                       "methods": {"fft": {"kind": "fft"}}})
    layout = Layout(spec, {}, Location(str(tmp_path)))
    assert list(layout.branches) == ["fft"] and layout.planners[3].spec.seed == 3
    row = {"a": {name: 0.5 for name in NAMES}}
    out = record_results(spec, layout, Recording(), "parent", {"bases": {"": row}, "fft": {1: row}},
                         {"a": "exact_match"}).to_json()
    assert set(out) == {"parent_run_id", "output_dir", "methods"}
    assert set(out["methods"]["fft"]) == {"matrix", "summary"}
