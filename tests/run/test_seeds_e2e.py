"""`hft-ray run` over seeds end to end (real Ray, MLflow, training): the smoke pipeline with
`seeds: [0, 1]`, its means, deviations and paired comparisons recomputed from its own per-seed
output, the bases made per seed, the MLflow layout, and `hft-ray report` giving it back."""

import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
from scipy.stats import t

SMOKE = Path(__file__).parents[2] / "pipelines" / "smoke.yaml"
METRICS = ("OP", "BWT", "FWT", "forgetting", "heldout_delta")


@pytest.fixture(scope="module")
def seeded_run(tmp_path_factory, run_pipeline):
    folder = tmp_path_factory.mktemp("seeds")
    text = SMOKE.read_text().replace("steps: 20}", "steps: 10}")  # each stage 10 steps: the arithmetic is the point
    return (*run_pipeline(folder, text, "--set", "seeds=[0, 1]", "--set", f"output.dir={folder}/runs"), folder)


def test_the_json_holds_means_deviations_every_seed_and_the_comparisons(seeded_run):
    out, _, _, _, _ = seeded_run
    assert out["seeds"] == [0, 1] and out["compare_to"] == "fft" and set(out["comparisons"]) == {"hft"}
    for method in ("fft", "hft"):
        entry = out["methods"][method]
        assert set(entry) == {"matrix", "matrix_std", "summary", "summary_std", "per_seed"}
        seeds = [entry["per_seed"][s] for s in ("0", "1")]
        for metric in METRICS:
            values = [s["summary"][metric] for s in seeds]
            assert entry["summary"][metric] == pytest.approx(statistics.fmean(values))
            assert entry["summary_std"][metric] == pytest.approx(statistics.stdev(values))
        for row in range(3):
            for column in range(3):
                cells = [s["matrix"]["scores"][row][column] for s in seeds]
                assert entry["matrix"]["scores"][row][column] == pytest.approx(statistics.fmean(cells))
                assert entry["matrix_std"]["scores"][row][column] == pytest.approx(statistics.stdev(cells))
    for metric in METRICS:  # the paired Student-t interval, from the per-seed summaries
        per_seed = {m: out["methods"][m]["per_seed"] for m in ("fft", "hft")}
        d = [per_seed["hft"][s]["summary"][metric] - per_seed["fft"][s]["summary"][metric] for s in ("0", "1")]
        half = t.ppf(0.975, 1) * statistics.stdev(d) / math.sqrt(2)
        compared = out["comparisons"]["hft"][metric]
        better = sum(x < 0 if metric == "forgetting" else x > 0 for x in d)
        assert (compared["n"], compared["better"]) == (2, better)
        assert compared["diff"] == pytest.approx(statistics.fmean(d))
        assert compared["ci95"] == pytest.approx([statistics.fmean(d) - half, statistics.fmean(d) + half])


def test_each_seed_pretrains_its_own_base_and_trains_its_own_branches(seeded_run):
    out, _, _, stderr, _ = seeded_run
    folder = Path(out["output_dir"])
    weights = [(folder / f"seed-{s}" / "base" / "model.safetensors").read_bytes() for s in (0, 1)]
    assert weights[0] != weights[1], "a built-in model's initialisation and pretraining order are the seed's"
    manifest = json.loads((folder / "manifest.json").read_text())
    assert set(manifest["bases"]) == {"seed-0", "seed-1"}
    assert set(manifest["branches"]) == {"fft@0", "hft@0", "fft@1", "hft@1"}
    for seed in (0, 1):
        assert f"pretrain@{seed} done: loss" in stderr and f"hft@{seed} stage 2/2 done" in stderr
        plans = [json.loads((folder / f"seed-{seed}" / "hft" / f"stage-{i}" / "plan.json").read_text()) for i in (1, 2)]
        assert [p["seed"] for p in plans] == [seed, seed]
    assert (json.loads((folder / "seed-0/hft/stage-1/plan.json").read_text())["trained"]
            != json.loads((folder / "seed-1/hft/stage-1/plan.json").read_text())["trained"]), "a draw per seed"


def test_mlflow_holds_the_means_the_comparisons_and_a_child_run_per_seed(seeded_run):
    out, client, children, _, _ = seeded_run
    parent = client.get_run(out["parent_run_id"])
    metrics = parent.data.metrics
    hft = out["methods"]["hft"]
    assert metrics["hft.OP"] == pytest.approx(hft["summary"]["OP"])
    assert metrics["hft.OP.std"] == pytest.approx(hft["summary_std"]["OP"])
    assert metrics["compare.hft.BWT.diff"] == pytest.approx(out["comparisons"]["hft"]["BWT"]["diff"])
    assert metrics["compare.hft.BWT.lo"] == pytest.approx(out["comparisons"]["hft"]["BWT"]["ci95"][0])
    stages = sorted((c.data.tags["hft.method"], c.data.tags["hft.seed"], c.data.tags["hft.stage"])
                    for c in children if c.data.tags["hft.kind"] == "stage")
    assert stages == sorted((m, s, i) for m in ("fft", "hft") for s in ("0", "1") for i in ("1", "2"))
    seeds = {(c.data.tags["hft.method"], c.data.tags["hft.seed"]): c
             for c in children if c.data.tags["hft.kind"] == "seed"}
    assert set(seeds) == {(m, s) for m in ("fft", "hft") for s in ("0", "1")}
    assert seeds["hft", "1"].data.metrics["OP"] == pytest.approx(hft["per_seed"]["1"]["summary"]["OP"])
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "forgetting")}
    assert {"forgetting/hft.json", "forgetting/hft.std.json", "forgetting/hft.png",
            "forgetting/comparison.png"} <= artifacts


def test_report_gives_back_what_run_printed(seeded_run):
    out, client, _, _, folder = seeded_run
    shown = subprocess.run([sys.executable, "-m", "hft_ray", "report", "--tracking-uri", client.tracking_uri, "--json"],
                           capture_output=True, text=True, timeout=120, cwd=folder)
    assert shown.returncode == 0, shown.stderr
    report = json.loads(shown.stdout)
    assert {k: report[k] for k in ("methods", "seeds", "compare_to", "comparisons")} == {
        k: out[k] for k in ("methods", "seeds", "compare_to", "comparisons")}
    text = subprocess.run([sys.executable, "-m", "hft_ray", "report", "--tracking-uri", client.tracking_uri],
                          capture_output=True, text=True, timeout=120, cwd=folder).stdout
    assert "mean±std over seeds 0, 1" in text and "compared with fft, seed by seed" in text
    assert "hft's OP is" in text and "better in" in text
