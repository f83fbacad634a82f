"""The run manifest behind --resume: what counts as done, atomic saves, the driver check."""

import subprocess
import sys
import time
from pathlib import Path

from hft_ray.run.manifest import FILE, Manifest


def test_finished_stages_count_from_the_first_and_reading_adds_nothing(tmp_path):
    manifest = Manifest(tmp_path, "digest")
    assert manifest.finished_stages("hft") == 0 and manifest.branches == {}
    manifest.stage("hft", 1)["checkpoint"] = "/ckpt/1"
    manifest.stage("hft", 2)["run_id"] = "run-2"          # started, not trained
    manifest.stage("hft", 3)["checkpoint"] = "/ckpt/3"    # not contiguous: does not count
    assert manifest.finished_stages("hft") == 1
    assert set(manifest.branches["hft"]["stages"]) == {"1", "2", "3"}


def test_a_saved_manifest_loads_back_whole_and_leaves_no_temporary_file(tmp_path):
    manifest = Manifest(tmp_path / "run", "digest", parent_run_id="p", attempt=2)
    manifest.base("seed-1")["checkpoint"] = "/base"
    manifest.stage("fft", 1).update(checkpoint="/c", row={"upper": {"exact_match": 1.0}})
    manifest.save()
    manifest.save()
    loaded = Manifest.load(tmp_path / "run")
    assert (loaded.parent_run_id, loaded.attempt) == ("p", 2)
    assert (loaded.bases, loaded.branches) == ({"seed-1": {"checkpoint": "/base"}}, manifest.branches)
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [FILE]


def test_the_driver_check_sees_a_live_driver_and_not_a_dead_one(tmp_path):
    manifest = Manifest(tmp_path, "digest")
    assert not manifest.driver_alive(), "this process is the driver, not another live one"
    driver = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "hft-ray-driver"])
    try:
        manifest.driver["pid"] = driver.pid
        # Until the child has exec'd, /proc shows the parent's command line (this test's).
        deadline = time.monotonic() + 10
        while b"hft-ray-driver" not in Path(f"/proc/{driver.pid}/cmdline").read_bytes() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert manifest.driver_alive()
    finally:
        driver.kill()
        driver.wait()
    assert not manifest.driver_alive()
