"""`hft-ray submit`: run a pipeline or a tune space on a Ray cluster as a Ray Job.

The client validates the file here (exit 2 before anything is sent), bundles it with the local
files it names (bundle.py), submits `python -m hft_ray run|tune ...` with that bundle as the
job's working_dir, and reports the job id and the MLflow parent run id, which the job prints
as soon as it has created the run. With --wait it streams the job's logs and exits with the
job's exit code (0 done, 1 failed at run time, 2 bad input on the cluster's side).
"""

from __future__ import annotations

import asyncio
import os
import re
import secrets
import shlex
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from hft_ray.errors import UserError
from hft_ray.storage import Location

RUN_ID_LINE = re.compile(r"MLflow parent run ([0-9a-f]{32})")
RUN_ID_WAIT_S = 300  # without --wait: how long to wait for the job to name its MLflow run


@dataclass(frozen=True)
class Submission:
    entrypoint: str
    bundle: Path
    carried: list[str]
    name: str


def auth_headers() -> dict[str, str]:
    """Ray's token, from where Ray itself looks (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH,
    ~/.ray/auth_token), as a bearer header; none when RAY_AUTH_MODE=disabled or no token."""
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled":
        return {}
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if not token:
        path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
        token = path.read_text().strip() if path.is_file() else ""
    return {"Authorization": f"Bearer {token}"} if token else {}


def connect(address: str):
    """A JobSubmissionClient for `address`; connection and token problems are UserErrors."""
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address, headers=auth_headers())
    except AuthenticationError:
        raise UserError(f"--address {address}: the cluster refused the Ray token; set RAY_AUTH_TOKEN (or "
                        "RAY_AUTH_TOKEN_PATH) to the cluster's token (`ray get-auth-token` on the head node)") from None
    except ConnectionError as error:
        raise UserError(f"--address {address}: no Ray dashboard answers there ({str(error).splitlines()[0]}); "
                        "start a head with `ray start --head` or give its dashboard address, "
                        "e.g. http://127.0.0.1:8265") from None


def _absolute_tracking_uri(uri: str) -> str:
    """A relative sqlite store becomes absolute: the job runs in its own working folder."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        return prefix + str(Path(uri.removeprefix(prefix)).resolve())
    return uri


def prepare_submission(kind: str, path: str, overrides: list[str], tracking_uri: str,
                       storage_path: str | None, extra_args: list[str], bundle: Path) -> Submission:
    """Validate the file as `hft-ray run|tune` would, then write the job's bundle."""
    from hft_ray.cli.bundle import PIPELINE_FILE, SPACE_FILE, write_pipeline_bundle, write_space_bundle
    from hft_ray.config.files import read_yaml
    from hft_ray.config.preflight import prepare
    from hft_ray.config.space import load_space
    from hft_ray.config.spec import load_spec

    if kind == "run":
        spec, _ = load_spec(path, overrides)
        prepare(spec, Path(path).parent)
        data, _ = read_yaml(path, "pipeline", overrides)
        pipeline_data, pipeline_dir, name, target = data, Path(path).parent, spec.name, PIPELINE_FILE
    else:
        loaded = load_space(path, overrides)
        prepare(loaded.spec, loaded.pipeline_path.parent)
        space_data, _ = read_yaml(path, "space", overrides)
        pipeline_data, pipeline_dir, name, target = (loaded.pipeline_data, loaded.pipeline_path.parent,
                                                     loaded.spec.name, SPACE_FILE)
    output = pipeline_data.setdefault("output", {})
    output["dir"] = storage_path or str(Location(output.get("dir", "hft_runs")))  # a folder made absolute here
    if kind == "run":
        carried = write_pipeline_bundle(pipeline_data, pipeline_dir, bundle)
    else:
        carried = write_space_bundle(space_data, pipeline_data, pipeline_dir, bundle)
    args = ["python", "-m", "hft_ray", kind, target, "--tracking-uri", _absolute_tracking_uri(tracking_uri),
            *extra_args]
    return Submission(shlex.join(args), bundle, carried, name)


def job_exit_code(info) -> int:
    """The exit code `hft-ray submit` reports for a finished job."""
    from ray.job_submission import JobStatus

    if info.status == JobStatus.SUCCEEDED:
        return 0
    code = getattr(info, "driver_exit_code", None)
    return code if code in (1, 2) else 1


async def _stream(client, job_id: str, echo) -> str | None:
    """Print the job's logs as they come; the MLflow run id when a line names it."""
    run_id, partial = None, ""
    async for chunk in client.tail_job_logs(job_id):
        echo(chunk)
        partial += chunk
        if run_id is None and (match := RUN_ID_LINE.search(partial)):
            run_id = match.group(1)
        partial = partial[-200:]
    return run_id


def _wait_for_run_id(client, job_id: str) -> str | None:
    """Poll the job's logs until it names its MLflow run, ends, or RUN_ID_WAIT_S pass."""
    deadline = time.monotonic() + RUN_ID_WAIT_S
    while time.monotonic() < deadline:
        if match := RUN_ID_LINE.search(client.get_job_logs(job_id)):
            return match.group(1)
        if client.get_job_status(job_id).is_terminal():
            return None
        time.sleep(1)
    return None


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def submit(kind: str, path: str, address: str, *, overrides: list[str], tracking_uri: str,
           storage_path: str | None, extra_args: list[str], wait: bool) -> int:
    problems, client, submission = [], None, None
    try:
        client = connect(address)
    except UserError as error:
        problems += error.problems
    with tempfile.TemporaryDirectory(prefix="hft-ray-job-") as folder:
        try:
            submission = prepare_submission(kind, path, overrides, tracking_uri, storage_path, extra_args, Path(folder))
        except UserError as error:
            problems += error.problems
        if problems:
            raise UserError(*problems)
        job_id = f"hft-ray-{submission.name}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"
        # The bundle is uploaded here; the folder can go once submit_job returns.
        try:
            client.submit_job(entrypoint=submission.entrypoint, submission_id=job_id,
                              runtime_env={"working_dir": str(submission.bundle)},
                              metadata={"hft.kind": kind, "hft.pipeline": submission.name})
        except Exception as error:  # the upload or the request: Ray raises several types
            _say(f"hft-ray: the cluster did not take the job: {str(error).strip().splitlines()[0]}")
            return 1
    _say(f"hft-ray: submitted job {job_id} to {address}: {submission.entrypoint}")
    for name in submission.carried:
        _say(f"hft-ray: carried {name} with the job")
    if wait:
        try:
            run_id = asyncio.run(_stream(client, job_id, lambda text: print(text, end="", flush=True)))
        except KeyboardInterrupt:
            _say(f"hft-ray: stopped following; job {job_id} goes on (stop it with: "
                f"ray job stop --address {address} {job_id})")
            return 130
        info = client.get_job_info(job_id)
        code = job_exit_code(info)
        _say(f"hft-ray: job {job_id} {info.status}" + (f": {info.message}" if code else ""))
    else:
        run_id = _wait_for_run_id(client, job_id)
        info = client.get_job_info(job_id)
        code = job_exit_code(info) if info.status.is_terminal() else 0
        _say(f"hft-ray: follow it with: ray job logs --follow --address {address} {job_id}")
    print(f"job: {job_id}")
    print(f"mlflow run: {run_id or 'not named by the job'}")
    return code
