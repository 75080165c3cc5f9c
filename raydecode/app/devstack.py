"""The development stack on 127.0.0.1: an S3 endpoint (moto's server mode) with a bucket, and an MLflow tracking
server (sqlite backend store, artifacts served by the server from that S3). ``infra/local/stack up|down|env|status``
runs it; the integration tests use it as a fixture.

``up`` starts both as background processes (their own process groups, logs under the state directory), waits until
they answer, creates the bucket and prints the environment to export (``export AWS_ENDPOINT_URL_S3=...``); ``down``
stops them (SIGTERM, then SIGKILL after a grace period) and removes the state file. A second ``up`` while the stack
runs reuses it.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

from raydecode.errors import ConfigError

STATE_FILE = "stack.json"
DEFAULT_DIR = os.path.join("work", "stack")
BUCKET = "raydecode-local"
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1",
               "AWS_DEFAULT_REGION": "us-east-1"}


@dataclass
class Stack:
    state_dir: str
    s3_port: int
    mlflow_port: int
    bucket: str = BUCKET
    pids: dict[str, int] = field(default_factory=dict)

    @property
    def s3_endpoint(self) -> str:
        return f"http://127.0.0.1:{self.s3_port}"

    @property
    def tracking_uri(self) -> str:
        return f"http://127.0.0.1:{self.mlflow_port}"

    def env(self) -> dict[str, str]:
        """What a client (a stage, `ray job submit`, boto3, pyarrow through raydecode.storage) needs."""
        return {"AWS_ENDPOINT_URL_S3": self.s3_endpoint, "MLFLOW_S3_ENDPOINT_URL": self.s3_endpoint, **CREDENTIALS,
                "MLFLOW_TRACKING_URI": self.tracking_uri, "RAYDECODE_BUCKET": f"s3://{self.bucket}"}

    def alive(self) -> bool:
        return bool(self.pids) and all(_alive(p) for p in self.pids.values())


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return True


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, proc: subprocess.Popen, log: Path, timeout_s: float) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if proc.poll() is not None:
            tail = log.read_text()[-800:] if log.exists() else ""
            raise ConfigError(f"{proc.args[0]} exited with {proc.returncode} while starting (log {log}): "
                              f"{tail.strip().splitlines()[-1] if tail.strip() else 'no output'}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.3)
    raise ConfigError(f"{url} did not answer within {timeout_s:.0f} s (log {log})")


def read_state(state_dir: str = DEFAULT_DIR) -> Stack | None:
    path = Path(state_dir, STATE_FILE)
    if not path.exists():
        return None
    return Stack(**json.loads(path.read_text()))


def _spawn(args: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen:
    with open(log, "ab") as out:
        return subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env={**os.environ, **env}, start_new_session=True)


def up(state_dir: str = DEFAULT_DIR, s3_port: int = 0, mlflow_port: int = 0, bucket: str = BUCKET,
       timeout_s: float = 90.0) -> Stack:
    """Start the stack (or return the running one)."""
    import boto3

    running = read_state(state_dir)
    if running is not None and running.alive():
        return running
    if running is not None:  # a stale state file: whatever is left of it goes first
        down(state_dir)
    root = Path(state_dir).resolve()
    root.mkdir(parents=True, exist_ok=True)
    stack = Stack(str(root), s3_port or _free_port(), mlflow_port or _free_port(), bucket)
    procs: dict[str, subprocess.Popen] = {}
    try:
        log = root / "s3.log"
        procs["s3"] = _spawn([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(stack.s3_port)],
                             log, CREDENTIALS)
        _wait_http(stack.s3_endpoint, procs["s3"], log, timeout_s)
        s3 = boto3.client("s3", endpoint_url=stack.s3_endpoint, region_name=CREDENTIALS["AWS_REGION"],
                          aws_access_key_id="testing", aws_secret_access_key="testing")
        s3.create_bucket(Bucket=bucket)
        log = root / "mlflow.log"
        mlflow = Path(sys.executable).with_name("mlflow")
        procs["mlflow"] = _spawn(
            [str(mlflow), "server", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
             "--artifacts-destination", f"s3://{bucket}/mlflow", "--serve-artifacts",
             "--host", "127.0.0.1", "--port", str(stack.mlflow_port), "--workers", "1"],
            log, {**CREDENTIALS, "MLFLOW_S3_ENDPOINT_URL": stack.s3_endpoint})
        _wait_http(f"{stack.tracking_uri}/health", procs["mlflow"], log, timeout_s)
    except BaseException:
        _stop_all([p.pid for p in procs.values()])
        raise
    stack.pids = {k: p.pid for k, p in procs.items()}
    (root / STATE_FILE).write_text(json.dumps(asdict(stack), indent=1))
    return stack


def _gone(pid: int) -> bool:
    try:
        return os.waitpid(pid, os.WNOHANG)[0] == pid
    except ChildProcessError:  # not our child: poll until it is gone
        return not _alive(pid)


def _stop_all(pids: list[int], grace_s: float = 10.0) -> None:
    """SIGTERM every process group at once, SIGKILL what is left after the grace period."""
    left = []
    for pid in pids:
        try:
            os.killpg(pid, signal.SIGTERM)
            left.append(pid)
        except OSError:
            pass
    deadline = time.time() + grace_s
    while left and time.time() < deadline:
        left = [pid for pid in left if not _gone(pid)]
        if left:
            time.sleep(0.2)
    for pid in left:
        try:
            os.killpg(pid, signal.SIGKILL)
        except OSError:
            pass


def down(state_dir: str = DEFAULT_DIR) -> bool:
    """Stop the stack; False if none was recorded."""
    stack = read_state(state_dir)
    if stack is None:
        return False
    _stop_all(list(stack.pids.values()))
    Path(state_dir, STATE_FILE).unlink(missing_ok=True)
    return True


def exports(stack: Stack) -> str:
    return "\n".join(f"export {k}={v}" for k, v in stack.env().items())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="infra/local/stack", description=__doc__.split("\n")[0])
    parser.add_argument("action", choices=["up", "down", "env", "status"])
    parser.add_argument("--dir", default=os.environ.get("RAYDECODE_STACK_DIR", DEFAULT_DIR),
                        help=f"state directory (default {DEFAULT_DIR}, or RAYDECODE_STACK_DIR)")
    parser.add_argument("--s3-port", type=int, default=0, help="default: a free port")
    parser.add_argument("--mlflow-port", type=int, default=0, help="default: a free port")
    args = parser.parse_args(argv)
    try:
        if args.action == "up":
            stack = up(args.dir, args.s3_port, args.mlflow_port)
            print(f"# S3 (moto) {stack.s3_endpoint}, bucket s3://{stack.bucket}; MLflow {stack.tracking_uri} "
                  f"(sqlite in {stack.state_dir}, artifacts in s3://{stack.bucket}/mlflow)\n"
                  f"# eval \"$(infra/local/stack env)\" to use it; infra/local/stack down to stop it")
            print(exports(stack))
        elif args.action == "down":
            print("stopped" if down(args.dir) else f"no stack recorded in {args.dir}")
        else:
            stack = read_state(args.dir)
            if stack is None or not stack.alive():
                print(f"error: no running stack in {args.dir} (infra/local/stack up)", file=sys.stderr)
                return 1
            print(exports(stack) if args.action == "env" else
                  f"running: S3 {stack.s3_endpoint} (pid {stack.pids['s3']}), MLflow {stack.tracking_uri} "
                  f"(pid {stack.pids['mlflow']})")
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
