"""`hft-ray ui`: the MLflow UI (an `mlflow server`) over the project's store, on 127.0.0.1.

For a sqlite store, artifacts that runs write through this server land beside the database
(`mlartifacts/`), where local runs put theirs too. Cluster jobs can log to it over http:
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

START_TIMEOUT_S = 120


def server_command(tracking_uri: str, host: str, port: int, workers: int = 1) -> list[str]:
    if tracking_uri.startswith(("http://", "https://")):
        raise UserError(f"--tracking-uri {tracking_uri}: that is a tracking server already; open it in a browser")
    command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", tracking_uri,
               "--host", host, "--port", str(port), "--workers", str(workers)]
    if tracking_uri.startswith("sqlite:///"):
        db = Path(tracking_uri.removeprefix("sqlite:///")).resolve()
        if not db.parent.is_dir():
            raise UserError(f"--tracking-uri {tracking_uri}: folder {db.parent} does not exist; create it or "
                            "point at another store")
        command += ["--artifacts-destination", str(db.parent / "mlartifacts")]
    return command


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


def serve(tracking_uri: str, host: str, port: int) -> int:
    """Run the server until it exits, Ctrl-C or SIGTERM; our one line goes to stdout, the
    server's logs to stderr."""
    url = f"http://{host}:{port}"
    if _healthy(url):
        raise UserError(f"--port {port}: something already serves {url}; pick another port with --port")
    # Its own process group: Ctrl-C reaches us, and we stop the server with all its workers.
    server = subprocess.Popen(server_command(tracking_uri, host, port), stdout=sys.stderr, start_new_session=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not _healthy(url):
            if server.poll() is not None:
                print(f"hft-ray: the MLflow server exited with code {server.returncode} (is port {port} taken?)", file=sys.stderr)
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
