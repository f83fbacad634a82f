"""A pipeline whose branches can never fit a fixed cluster is bad input: exit 2 before anything
starts, naming what a branch needs and what the cluster has."""

import subprocess
import sys
from pathlib import Path

SMOKE = Path(__file__).parents[2] / "pipelines" / "smoke.yaml"


def test_more_workers_than_this_machine_has_exit_2_before_anything_starts(tmp_path):
    result = subprocess.run([sys.executable, "-m", "hft_ray", "run", str(SMOKE), "--set", "train.workers=512",
                             "--set", "train.batch_size=512", "--tracking-uri", f"sqlite:///{tmp_path}/m.db",
                             "--set", f"output.dir={tmp_path}/runs"],
                            capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "train.workers: 512 worker(s) x 1 CPU need 512 CPUs per branch" in result.stderr
    assert "cannot grow (no autoscaler)" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "m.db").exists() and not (tmp_path / "runs").exists()


def test_a_custom_resource_no_node_has_exits_2_naming_the_key(tmp_path):
    result = subprocess.run([sys.executable, "-m", "hft_ray", "run", str(SMOKE),
                             "--set", "train.resources_per_worker={trainer: 1}",
                             "--set", "eval.resources={evaluator: 1}",
                             "--tracking-uri", f"sqlite:///{tmp_path}/m.db", "--set", f"output.dir={tmp_path}/runs"],
                            capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "train.resources_per_worker.trainer: needs 1 of resource 'trainer'; this machine (embedded Ray) has 0" \
        in result.stderr
    assert "eval.resources.evaluator: needs 1 of resource 'evaluator'" in result.stderr
    assert "ray start --resources" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "m.db").exists() and not (tmp_path / "runs").exists()
