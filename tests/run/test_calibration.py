"""The built-in suite stays in the fine-tuning regime (issue 15): `hft-ray run
pipelines/quickstart.yaml` as shipped, and its matrices checked against the calibration targets
of benchmarks/CALIBRATION.md: every stage learnt by FFT and HFT (>= 0.9, exact match and token
accuracy), and FFT forgetting part of each earlier stage, not all (each earlier stage's final
exact match above 0 and below its diagonal; BWT between -0.6 and -0.1 on token accuracy).

Exact match's BWT is not held to that window: with the same settings it is -0.46, -0.79 and -0.83
over seeds 0-2 (benchmarks/results/forgetting.json), and seed 0 alone moves between -0.45 and
-0.73 with the CPU's floating-point path (AVX-512 or AVX2 kernels) and the batch shapes; an exact
match needs every letter of a word, so it amplifies a per-letter change (about p^5). Slow (the
whole quickstart, ~5 min on 2 cores)."""

import json
from pathlib import Path

import pytest

from hft_ray.core.metrics import ForgettingMatrix, summary

QUICKSTART = Path(__file__).parents[2] / "pipelines" / "quickstart.yaml"


@pytest.mark.slow
def test_every_stage_is_learnt_and_full_fine_tuning_forgets_part_of_each_earlier_stage(tmp_path, run_pipeline):
    # The joint reference is left out: branches draw their own seeds, so it changes neither FFT's nor
    # HFT's matrix, and the test saves a quarter of its time.
    methods = "{fft: {kind: fft}, hft: {kind: hft, granularity: category, ratio: 0.5}}"
    out, client, _, _ = run_pipeline(tmp_path, QUICKSTART.read_text(), "--set", f"output.dir={tmp_path}/runs",
                                     "--set", f"methods={methods}")
    graded = {m: ForgettingMatrix.from_dict(json.loads(Path(client.download_artifacts(
        out["parent_run_id"], f"forgetting/{m}.token_accuracy.json", str(tmp_path))).read_text()))
        for m in out["methods"]}
    exact = {m: ForgettingMatrix.from_dict(v["matrix"]) for m, v in out["methods"].items()}
    for method in ("fft", "hft"):
        for matrix in (exact[method], graded[method]):
            stages = matrix.stage_domains
            diagonal = [matrix.score(i, d) for i, d in enumerate(stages, start=1)]
            assert min(diagonal) >= 0.9, (method, diagonal)
    assert -0.6 <= summary(graded["fft"])["BWT"] <= -0.1, graded["fft"].to_dict()
    fft = exact["fft"]
    last = len(fft.rows) - 1
    for i, domain in enumerate(fft.stage_domains[:-1], start=1):  # part of each, not all, not none
        assert 0.0 < fft.score(last, domain) < fft.score(i, domain), (domain, fft.to_dict())
