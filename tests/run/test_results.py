"""A run's matrices as logged (hft_ray/run/results.py), through a tracker that only records: each
column reads its own score, and the matrix of every other score is logged beside it."""

from hft_ray.config.spec import parse_spec
from hft_ray.core.scores import NAMES
from hft_ray.run.results import record_results
from hft_ray.storage import Location


class Recording:
    def __init__(self):
        self.json, self.files, self.metrics = {}, [], {}

    def log_json(self, run_id, data, path):
        self.json[path] = data

    def log_text(self, run_id, text, path):
        pass

    def log_file(self, run_id, path, folder):
        self.files.append(f"{folder}/{path.name}")

    def log_metrics(self, run_id, metrics):
        self.metrics.update(metrics)


def test_each_column_its_own_score_and_every_other_score_beside_it(tmp_path):
    spec = parse_spec({"name": "t", "model": {"source": "builtin:tiny-llama"},
                       "domains": {"a": {"source": "builtin:upper"}, "b": {"source": "builtin:caesar"}},
                       "stages": [{"domain": "a", "steps": 1}], "methods": {"fft": {"kind": "fft"}}})
    row = {c: {name: (i + 1) / 10 + (c == "b") / 100 for i, name in enumerate(NAMES)} for c in "ab"}
    tracker = Recording()
    result = record_results(spec, tracker, "parent", Location(str(tmp_path)), {"base": row, "fft": {1: row}},
                            {"a": "exact_match", "b": "rouge_l"})
    assert result.matrices["fft"].scores[0] == (row["a"]["exact_match"], row["b"]["rouge_l"])
    assert tracker.json["forgetting/fft.json"]["scores"][1] == [row["a"]["exact_match"], row["b"]["rouge_l"]]
    assert set(tracker.json) == {"forgetting/fft.json", *(f"forgetting/fft.{name}.json" for name in NAMES)}
    assert tracker.json["forgetting/fft.token_accuracy.json"]["scores"][0] == [row[c]["token_accuracy"] for c in "ab"]
    assert {"forgetting/fft.png", "forgetting/comparison.png"} <= set(tracker.files)
