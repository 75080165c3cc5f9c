"""Shared fixtures: a tiny synthetic store, a local Ray cluster, a moto S3 server on 127.0.0.1, a pretrained
tiny MindEye2 (the start of every fine-tune, adaptation and sweep test)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

os.environ.pop("MLFLOW_TRACKING_URI", None)  # before raydecode reads it: tests keep their runs in their own sqlite files

from raydecode.config import TrainConfig  # noqa: E402
from raydecode.data.ingest import run_ingest, synthetic_plan
from raydecode.storage import S3Options

# the test cluster's own S3 credentials (moto's server takes any), as a node's environment gives them: configs never
# carry credentials to workers; a test that sets them in a config sees them exported to this process alone
S3_KEYS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
for _k, _v in S3_KEYS.items():
    os.environ.setdefault(_k, _v)
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("TQDM_DISABLE", "1")
# Ray Train's controller polls its workers every 2 s (reports, checkpoints, the end of a run): tiny runs poll faster
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")


# the fault matrix: (fault, what happened, data lost), one row per fault test (tests/test_faults.py and the fault
# injected into other tests' fixtures), printed at the end of the session
FAULTS: list[tuple[str, str, str]] = []


def pytest_terminal_summary(terminalreporter):
    if LEAKS:
        terminalreporter.write_sep("-", "leaked Ray processes")
        for line in LEAKS:
            terminalreporter.write_line(line)
    if FAULTS:
        width = max(len(f) for f, _, _ in FAULTS)
        terminalreporter.write_sep("-", "fault matrix")
        for fault, outcome, lost in FAULTS:
            terminalreporter.write_line(f"{fault.ljust(width)}  {outcome}; data lost: {lost}")


# Ray Train controllers still alive after the test that started them (a finished or failed run's controller exits)
LEAKS: list[str] = []
SESSION_START = time.time()
REPORTED: set[int] = set()


def _ray_processes(title: str = "ray::") -> list[tuple[int, int, str]]:
    """(pid, parent pid, title) of the Ray processes this session started whose title starts with ``title``."""
    import psutil

    procs = []
    for p in psutil.process_iter(["pid", "ppid", "cmdline", "create_time"]):
        cmd = p.info["cmdline"] or []
        if cmd and cmd[0].startswith(title) and (p.info["create_time"] or 0) >= SESSION_START:
            procs.append((p.info["pid"], p.info["ppid"], cmd[0]))
    return procs


@pytest.fixture(autouse=True)
def no_leaked_train_controller(request):
    """After every test (its fixtures' runs included), no ``ray::TrainController`` of this session may be alive: a
    finished run's controller exits; one left holds ~700 MB and can outlive the session's ``ray.shutdown()``."""
    yield
    deadline = time.time() + 10
    while True:
        left = [pid for pid, _, _ in _ray_processes("ray::TrainController") if pid not in REPORTED]
        if not left or time.time() > deadline:
            break
        time.sleep(0.5)
    for pid in left:
        REPORTED.add(pid)
        LEAKS.append(f"{request.node.nodeid}: ray::TrainController pid {pid} outlived the test")


def pytest_sessionfinish(session, exitstatus):
    """Fail the session when a Ray process of it outlives it (``ray.shutdown()`` has run by now)."""
    time.sleep(2)
    LEAKS.extend(f"after the session: {title} pid {pid} (parent {ppid})" for pid, ppid, title in _ray_processes()
                 if ppid in (1, os.getpid()))
    if LEAKS and session.exitstatus == 0:
        session.exitstatus = 1


def pytest_collection_modifyitems(items):
    """The cluster tests first: they start their own Ray cluster with `ray start`, and a job submitted to it waits
    forever for nodes once this process holds a local Ray session (``ray_local``, which later tests share)."""
    items.sort(key=lambda item: item.get_closest_marker("cluster") is None)  # stable: file order otherwise


@pytest.fixture(scope="session")
def tiny_store(tmp_path_factory) -> str:
    """A tiny synthetic store (seed 0), ingested once per session. Tests must not modify it."""
    out = tmp_path_factory.mktemp("stores") / "tiny"
    run_ingest(synthetic_plan("tiny", 0), str(out), progress=False)
    return str(out)


@pytest.fixture
def store_copy(tiny_store, tmp_path) -> str:
    """A private copy of the tiny store that a test may damage."""
    dst = tmp_path / "store"
    shutil.copytree(tiny_store, dst)
    return str(dst)


@pytest.fixture(scope="session")
def ray_local():
    import ray

    if not ray.is_initialized():
        from raydecode.runtime import local_system_config, require_token_auth

        require_token_auth()
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="warning",
                 _system_config=local_system_config())
    yield ray
    ray.shutdown()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server over HTTP on 127.0.0.1, with a bucket `nsd`. Yields the S3Options to reach it."""
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    opts = S3Options(
        endpoint_url=f"http://127.0.0.1:{port}", region="us-east-1",
        access_key_id="testing", secret_access_key="testing",
    )
    import boto3

    boto3.client(
        "s3", endpoint_url=opts.endpoint_url, region_name="us-east-1",
        aws_access_key_id="testing", aws_secret_access_key="testing",
    ).create_bucket(Bucket="nsd")
    yield opts
    server.stop()


class MlflowServer:
    """A real ``mlflow server`` (sqlite backend; artifacts written by the clients straight to moto's S3) that a
    test can stop and start again on the same port: a tracking outage."""

    def __init__(self, root: Path, s3: S3Options):
        self.root, self.port, self.s3 = root, _free_port(), s3
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        import time
        import urllib.request

        env = {**os.environ, **self.s3.env()}
        self.proc = subprocess.Popen(
            [str(Path(sys.executable).with_name("mlflow")), "server", "--host", "127.0.0.1", "--port", str(self.port),
             "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}", "--no-serve-artifacts",
             "--default-artifact-root", "s3://nsd/mlflow-server", "--workers", "1"],
            env=env, stdout=open(self.root / "server.log", "ab"), stderr=subprocess.STDOUT, start_new_session=True)
        for _ in range(240):
            try:
                urllib.request.urlopen(self.url + "/health", timeout=1).read()
                return
            except OSError:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"mlflow server exited: {(self.root / 'server.log').read_text()[-2000:]}")
                time.sleep(0.25)
        raise RuntimeError("mlflow server did not answer in 60 s")

    def stop(self) -> None:
        import signal

        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:  # a loaded machine: gunicorn's workers take their time; stop it
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(30)
        self.proc = None


@pytest.fixture(scope="session")
def mlflow_server(s3_server, tmp_path_factory):
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server"), s3_server)
    server.start()
    yield server
    server.stop()


def run_cli(*args: str, env: dict | None = None, cwd: str | None = None) -> subprocess.CompletedProcess:
    """Run the real console script in a subprocess."""
    full_env = {**os.environ, **(env or {})}
    exe = Path(sys.executable).with_name("raydecode")
    return subprocess.run([str(exe), *args], capture_output=True, text=True, env=full_env, cwd=cwd, timeout=600)


def run_main(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """The console script's ``main`` in this process (no interpreter start-up: seconds per call on 2 cores), its
    output captured as :func:`run_cli` gives it; ``env`` is set for the call and the environment restored after."""
    import contextlib
    import io

    from raydecode.app.cli import main

    saved = dict(os.environ)
    os.environ.update(env or {})
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(list(args))
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return subprocess.CompletedProcess(["raydecode", *args], code, out.getvalue(), err.getvalue())


# -- training ------------------------------------------------------------------------------

SOURCE_SUBJECTS = [1, 2, 3, 4, 5, 6]  # 7 and 8 are the new subjects
STEPS_PER_EPOCH = 6 * 150 // 2 // 32  # tiny store: 150 train trials per subject; 2 workers; batch 32


def tiny_config(store: str, workdir: Path, run_name: str, **over) -> TrainConfig:
    base = {
        "store": store, "workdir": str(workdir), "run_name": run_name, "preset": "tiny",
        "data": {"subjects": SOURCE_SUBJECTS, "categories": False, "read_cpus": 0.25},
        "optim": {"epochs": 6, "batch_size": 32, "lr": 1e-3},
        "scaling": {"num_workers": 2, "cpus_per_worker": 0.25},
        "deepspeed": {"zero_stage": 2},
    }
    for key, value in over.items():
        if isinstance(value, dict):
            base[key] = {**base.get(key, {}), **value}
        else:
            base[key] = value
    return TrainConfig.model_validate(base)


def metric_history(cfg: TrainConfig, run_id: str, key: str) -> list[tuple[int, float]]:
    from mlflow.tracking import MlflowClient

    return [(m.step, m.value) for m in MlflowClient(cfg.resolved_tracking_uri()).get_metric_history(run_id, key)]


@pytest.fixture(scope="session")
def pretrained(tiny_store, ray_local, tmp_path_factory):
    """Pretrain on the 6 source subjects: 2 workers, ZeRO-2, 6 epochs of 14 steps. Rank 1 is killed in
    epoch 2 (after the epoch-1 checkpoint, max_failures=1): the group must resume, not start over."""
    work = tmp_path_factory.mktemp("pretrain")
    cfg = tiny_config(tiny_store, work, "pretrain-tiny", checkpoint={"max_failures": 1},
                      fault_injection={"rank": 1, "at_step": STEPS_PER_EPOCH + 3, "marker": str(work / "killed")})
    from raydecode.train.launch import run_training

    return cfg, run_training(cfg)
