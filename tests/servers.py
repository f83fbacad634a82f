"""Real servers the tests start on loopback and stop: Ray nodes (`ray start`), an S3-compatible
store (moto's server, with IAM authentication on, as Ray's own tests use it) and MLflow.

Each is started in a process group of its own and stopped by killing that group: only the
processes a test started."""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

HFT_RAY = [sys.executable, "-m", "hft_ray"]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(url: str, process: subprocess.Popen, timeout: float, what: str, log: Path | None = None) -> None:
    """Until `url` answers (any HTTP status counts); AssertionError if `process` exits first."""
    deadline = time.monotonic() + timeout
    tail = lambda: f"; its log ends:\n{log.read_text()[-3000:]}" if log and log.exists() else ""  # noqa: E731
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"{what} exited with code {process.returncode}{tail()}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except urllib.error.HTTPError:  # it answers (401 without the token)
            return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"{what} did not answer on {url} within {timeout}s{tail()}")


def stop_group(process: subprocess.Popen) -> None:
    """Kill the process group `process` leads (started with start_new_session)."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait(timeout=30)


def start(command: list[str], env: dict, log: Path) -> subprocess.Popen:
    with log.open("w") as out:
        return subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


# -- an S3-compatible store ------------------------------------------------------------------------

@dataclass
class S3:
    endpoint: str
    bucket: str
    env: dict                  # what a user sets: AWS_ENDPOINT_URL, the key, the region

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id=self.env["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=self.env["AWS_SECRET_ACCESS_KEY"])

    def keys(self, prefix: str) -> list[str]:
        """The objects under `prefix` (not the empty "folder/" markers pyarrow leaves)."""
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
        return sorted(o["Key"] for page in pages for o in page.get("Contents", []) if not o["Key"].endswith("/"))

    def download(self, prefix: str, folder: Path) -> Path:
        for key in self.keys(prefix.rstrip("/") + "/"):
            target = folder / key[len(prefix.rstrip("/")) + 1:]
            target.parent.mkdir(parents=True, exist_ok=True)
            self.client().download_file(self.bucket, key, str(target))
        return folder


def start_s3(folder: Path) -> tuple[subprocess.Popen, S3]:
    """moto's server with IAM authentication: a user with a key allowed everything, and a bucket.
    A request signed with any other key is refused, as a real store would refuse it."""
    import boto3

    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "3"}  # the three calls that make the user
    server = start([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)], env, folder / "moto.log")
    wait_for(f"{endpoint}/moto-api/", server, 60, "moto_server", folder / "moto.log")
    iam = boto3.client("iam", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="setup",
                       aws_secret_access_key="setup")
    iam.create_user(UserName="hft")
    key = iam.create_access_key(UserName="hft")["AccessKey"]
    iam.put_user_policy(UserName="hft", PolicyName="all", PolicyDocument=json.dumps(
        {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}))
    s3 = S3(endpoint, f"hft-{secrets.token_hex(4)}", {
        "AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": key["AccessKeyId"],
        "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"], "AWS_DEFAULT_REGION": "us-east-1"})
    s3.client().create_bucket(Bucket=s3.bucket)
    return server, s3


# -- Ray nodes ---------------------------------------------------------------------------------------

def ray_env(token: str, extra: dict | None = None, nodes: int = 1) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    # A one-node cluster ("0") registers under 127.0.0.1 rather than this machine's network
    # address; a cluster that other nodes join needs "1" (nodes then name 127.0.0.1 themselves).
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=str(int(nodes > 1)),
               PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}", **(extra or {}))
    return env


def node_ports() -> list[str]:
    """The ports every Ray node on this machine needs of its own."""
    ports = {"--dashboard-agent-listen-port": free_port(), "--dashboard-agent-grpc-port": free_port(),
             "--runtime-env-agent-port": free_port(), "--metrics-export-port": free_port(),
             "--node-manager-port": free_port(), "--object-manager-port": free_port()}
    return [str(x) for pair in ports.items() for x in pair]


def start_head(temp: Path, token: str, cpus: int, resources: dict | None = None, env: dict | None = None,
               nodes: int = 1, gpus: int = 0) -> tuple[subprocess.Popen, dict]:
    """`ray start --head` on loopback with token authentication, for a cluster of `nodes` nodes
    on this machine; (process, {address, gcs, token, temp}). `gpus` are declared, not real: Ray
    schedules on them; nothing here runs on one."""
    dashboard, gcs = free_port(), free_port()
    command = [str(BIN / "ray"), "start", "--head", "--block", "--temp-dir", str(temp), "--port", str(gcs),
               "--dashboard-host", "127.0.0.1", "--include-dashboard", "true", "--dashboard-port", str(dashboard),
               "--ray-client-server-port", str(free_port()), "--num-cpus", str(cpus),
               "--object-store-memory", str(256 * 1024**2), "--disable-usage-stats", *node_ports(),
               *(["--resources", json.dumps(resources)] if resources else []),
               *(["--num-gpus", str(gpus)] if gpus else []),
               *(["--node-ip-address", "127.0.0.1"] if nodes > 1 else [])]
    head = start(command, ray_env(token, env, nodes), temp / "head.log")
    address = f"http://127.0.0.1:{dashboard}"
    wait_for(f"{address}/api/version", head, 180, "ray start --head", temp / "head.log")
    return head, {"address": address, "gcs": f"127.0.0.1:{gcs}", "token": token, "temp": temp}


def start_worker_node(head: dict, cpus: int, resources: dict | None = None,
                      env: dict | None = None) -> subprocess.Popen:
    """A second node joining `head` (`ray start --address`), on this machine."""
    command = [str(BIN / "ray"), "start", "--address", head["gcs"], "--block", "--num-cpus", str(cpus),
               "--object-store-memory", str(256 * 1024**2), "--disable-usage-stats", *node_ports(),
               "--node-ip-address", "127.0.0.1", *(["--resources", json.dumps(resources)] if resources else [])]
    return start(command, ray_env(head["token"], env, nodes=2), head["temp"] / "worker.log")


def ray_nodes(head: dict) -> list[dict]:
    """The cluster's alive nodes, as Ray's state API reports them."""
    request = urllib.request.Request(f"{head['address']}/api/v0/nodes?limit=100",
                                     headers={"Authorization": f"Bearer {head['token']}"})
    with urllib.request.urlopen(request, timeout=30) as response:
        nodes = json.load(response)["data"]["result"]["result"]
    return [n for n in nodes if n["state"] == "ALIVE"]


def client_env(token: str, extra: dict | None = None) -> dict:
    """The submitting user's environment: the token only (no RAY_AUTH_MODE: hft-ray sends it)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["RAY_AUTH_TOKEN"] = token
    return {**env, **(extra or {})}
