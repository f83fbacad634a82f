"""A pipeline whose branches can never fit a fixed cluster is bad input: exit 2 before anything
starts, naming what a branch needs and what the cluster has."""

import subprocess
import sys
from pathlib import Path

SMOKE = Path(__file__).parents[2] / "pipelines" / "smoke.yaml"


def test_more_workers_than_this_machine_has_exit_2_before_anything_starts(tmp_path):
    result = subprocess.run([sys.executable, "-m", "hft_ray", "run", str(SMOKE), "--set", "train.workers=512",
                             "--tracking-uri", f"sqlite:///{tmp_path}/m.db", "--set", f"output.dir={tmp_path}/runs"],
                            capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "train.workers: 512 worker(s) x 1 CPU need 512 CPUs per branch" in result.stderr
    assert "cannot grow (no autoscaler)" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "m.db").exists() and not (tmp_path / "runs").exists()
