"""The built-in suite stays in the fine-tuning regime (issue 15): `hft-ray run
pipelines/quickstart.yaml` as shipped, and its matrices checked against the calibration targets
of benchmarks/CALIBRATION.md. Slow (the whole quickstart, ~5 min on 2 cores): run with -m slow."""

import json
from pathlib import Path

import pytest

from hft_ray.core.metrics import ForgettingMatrix, summary

QUICKSTART = Path(__file__).parents[2] / "pipelines" / "quickstart.yaml"


@pytest.mark.slow
@pytest.mark.xfail(strict=False, reason=(
    "known regression, 2026-12-01: at this HEAD the quickstart is deterministic but its base differs from the "
    "README's (facts 0.940 against 0.987) and FFT's BWT is -0.7275, outside -0.6..-0.1; pretraining 200 steps "
    "through train_branch is bit-identical to 2f6690b, so the cause is still to find (issue 22 note)"))
def test_every_stage_is_learnt_and_full_fine_tuning_forgets_part_of_each_earlier_stage(tmp_path, run_pipeline):
    out, client, _, _ = run_pipeline(tmp_path, QUICKSTART.read_text(), "--set", f"output.dir={tmp_path}/runs")
    graded = {m: ForgettingMatrix.from_dict(json.loads(Path(client.download_artifacts(
        out["parent_run_id"], f"forgetting/{m}.token_accuracy.json", str(tmp_path))).read_text()))
        for m in out["methods"]}
    exact = {m: ForgettingMatrix.from_dict(v["matrix"]) for m, v in out["methods"].items()}
    for method in ("fft", "hft"):
        for matrix in (exact[method], graded[method]):
            stages = matrix.stage_domains
            diagonal = [matrix.score(i, d) for i, d in enumerate(stages, start=1)]
            assert min(diagonal) >= 0.9, (method, diagonal)
    for matrix in (exact["fft"], graded["fft"]):
        last = len(matrix.rows) - 1
        assert -0.6 <= summary(matrix)["BWT"] <= -0.1, matrix.to_dict()
        for i, domain in enumerate(matrix.stage_domains[:-1], start=1):  # part of each, not all, not none
            assert 0.0 < matrix.score(last, domain) < matrix.score(i, domain), (domain, matrix.to_dict())
