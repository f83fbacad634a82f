"""`hft-ray ui`: the MLflow UI (an `mlflow server`) over the project's store, on 127.0.0.1.

For a sqlite store, artifacts that runs write through this server land beside the database
(`mlartifacts/`), where local runs put theirs too; `--artifacts-destination s3://bucket/prefix`
puts them in an object store instead (the server writes there with the AWS variables of its
environment; clients need none). Cluster jobs can log to it over http:
`hft-ray submit ... --tracking-uri http://HOST:PORT`.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from hft_ray.errors import UserError
from hft_ray.storage import Location, check_writable, credentials_in

START_TIMEOUT_S = 120


def server_command(tracking_uri: str, host: str, port: int, workers: int = 1,
                   artifacts: str | None = None) -> list[str]:
    if tracking_uri.startswith(("http://", "https://")):
        raise UserError(f"--tracking-uri {tracking_uri}: that is a tracking server already; open it in a browser")
    command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", tracking_uri,
               "--host", host, "--port", str(port), "--workers", str(workers)]
    if artifacts:
        return command + ["--artifacts-destination", _artifacts_destination(artifacts)]
    if tracking_uri.startswith("sqlite:///"):
        db = Path(tracking_uri.removeprefix("sqlite:///")).resolve()
        if not db.parent.is_dir():
            raise UserError(f"--tracking-uri {tracking_uri}: folder {db.parent} does not exist; create it or "
                            "point at another store")
        command += ["--artifacts-destination", str(db.parent / "mlartifacts")]
    return command


def _artifacts_destination(uri: str) -> str:
    """An object store the server can write to (checked from here, with the same variables), or
    a local folder."""
    location = Location(uri)
    if not location.remote:
        return str(location)
    carried = credentials_in(uri)
    if carried:
        raise UserError(f"--artifacts-destination: the URI carries credentials ({carried}); remove them "
                        "and set AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY instead")
    if uri.startswith("s3://"):
        try:
            import boto3  # noqa: F401  (MLflow's S3 artifact store)
        except ImportError:
            raise UserError("--artifacts-destination s3://...: the MLflow server needs boto3 for it; "
                            "pip install 'hft-ray[s3]'") from None
    check_writable(location, "--artifacts-destination")
    return uri


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def _stop(server: subprocess.Popen) -> None:
    """Stop the server and whatever it started (its own process group)."""
    if server.poll() is None:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


def serve(tracking_uri: str, host: str, port: int, artifacts: str | None = None) -> int:
    """Run the server until it exits, Ctrl-C or SIGTERM; our one line goes to stdout, the
    server's logs to stderr."""
    url = f"http://{host}:{port}"
    if _healthy(url):
        raise UserError(f"--port {port}: something already serves {url}; pick another port with --port")
    # Its own process group: Ctrl-C reaches us, and we stop the server with all its workers.
    command = server_command(tracking_uri, host, port, artifacts=artifacts)
    server = subprocess.Popen(command, stdout=sys.stderr, start_new_session=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not _healthy(url):
            if server.poll() is not None:
                print(f"hft-ray: the MLflow server exited with code {server.returncode} (is port {port} taken?)",
                      file=sys.stderr)
                return 1
            if time.monotonic() > deadline:
                print(f"hft-ray: the MLflow server did not answer on {url} within {START_TIMEOUT_S}s", file=sys.stderr)
                return 1
            time.sleep(0.5)
        print(f"MLflow UI for {tracking_uri}: open {url} (Ctrl-C stops it)", flush=True)
        return server.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        _stop(server)
