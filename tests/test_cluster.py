"""Cluster deployment end to end on this machine: the local stack (moto's S3 server + an MLflow server on 127.0.0.1,
`infra/local/stack`), a Ray cluster started with `ray start` (token authentication on) shaped like the shipped ones:
a head with 0 CPUs for jobs and workers that join while a job waits. A tiny store is ingested into the stack's S3;
the pretrain stage, submitted with the real `ray job submit` CLI from jobs/pretrain.yaml when only one worker node
is up, waits for a second one (it asks for one worker per node), then reads S3, trains with DeepSpeed ZeRO-2,
checkpoints to S3 and logs to the MLflow server; embed, evaluate and a 2-trial sweep then run as jobs on the same
cluster. `raydecode submit` runs a stage through the Job SDK with the same token, and is refused without it."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import _free_port

from raydecode.runtime import LOCAL_SYSTEM_CONFIG

# `make test` runs these too (about 1.5 minutes); `make test-cluster` runs only these
pytestmark = pytest.mark.cluster

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _stack(action: str, state: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([str(ROOT / "infra" / "local" / "stack"), action, "--dir", state], text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "RAYDECODE_PYTHON": sys.executable}, **kw)


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    """The local stack (`infra/local/stack up`) and a Ray cluster of raylets (token auth on, running
    :func:`_node_python`): a head with 0 CPUs (as on the AWS launcher and KubeRay clusters, where the head runs no
    work) and one worker node with 2 logical CPUs; ``add_node()`` starts another worker node while a test's job
    waits. The nodes hold the stack's S3 credentials in their environment (a cluster's instance profile here); the
    endpoints reach a job through its runtime_env, as jobs/README.md says.
    Yields (stack state, the environment `stack up` printed, the dashboard address, a client env with the token, the
    head node's temp dir, add_node)."""
    from raydecode.app import devstack

    state = str(tmp_path_factory.mktemp("stack"))
    up = _stack("up", state)
    token = secrets.token_hex(16)
    # one temp dir per node, as on separate machines (short: Ray's unix sockets live under them): nodes sharing one
    # would unpack a job's working_dir into the same directory, one under the other's running driver
    temps = [tempfile.mkdtemp(prefix="rdc")]
    gcs, dash = _free_port(), _free_port()
    # the nodes' environment: the project installed (its console script on PATH), S3 credentials
    node_env = {**os.environ, **devstack.CREDENTIALS, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token,
                "RAY_DEDUP_LOGS": "0", "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
                # as a local Ray started by raydecode (raydecode.runtime.LOCAL_SYSTEM_CONFIG): workers are reused
                **{f"RAY_{k}": str(v) for k, v in LOCAL_SYSTEM_CONFIG.items()}}
    node_env.pop("RAY_ADDRESS", None)
    ray = [_node_python(tmp_path_factory.mktemp("node-python")), "-m", "ray.scripts.scripts"]
    procs = [subprocess.Popen([*ray, "start", "--head", "--block", f"--port={gcs}", "--dashboard-host=127.0.0.1",
                               f"--dashboard-port={dash}", "--num-cpus=0", f"--temp-dir={temps[0]}",
                               "--include-dashboard=true", "--disable-usage-stats"],
                              env=node_env, start_new_session=True, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)]
    address = f"http://127.0.0.1:{dash}"
    client_env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}
    client_env.pop("RAY_ADDRESS", None)

    def add_node() -> None:
        temps.append(tempfile.mkdtemp(prefix="rdc"))
        nodes = _alive_nodes(address, token)
        procs.append(subprocess.Popen([*ray, "start", "--block", f"--address=127.0.0.1:{gcs}", "--num-cpus=2",
                                       f"--temp-dir={temps[-1]}", "--disable-usage-stats"], env=node_env,
                                      start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        _wait(lambda: _alive_nodes(address, token) == nodes + 1, 120, f"worker node {len(procs) - 1}")

    try:
        out, err = up.communicate(timeout=180)
        assert up.returncode == 0, err
        env = dict(line[len("export "):].split("=", 1) for line in out.splitlines() if line.startswith("export "))
        _wait(lambda: _api(address, "/api/jobs/", token) is not None, 120, "the head node")
        add_node()
        yield devstack.read_state(state), env, address, client_env, temps[0], add_node
    finally:
        down = _stack("down", state)
        # the cluster's state is thrown away: a short grace, then the process groups are killed (a graceful
        # `ray start --block` shutdown takes 15-20 s per node here)
        for p in procs:
            os.killpg(p.pid, signal.SIGTERM)
        deadline = time.time() + 3
        for p in procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                pass
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait(timeout=30)
        for t in temps:
            shutil.rmtree(t, ignore_errors=True)
        out, _ = down.communicate(timeout=60)
        assert down.returncode == 0 and "stopped" in out


def _node_python(path: Path) -> str:
    """The nodes' Python: a virtualenv that layers this environment's packages (a `.pth` adds its site-packages), as
    a node image's Python has the project's dependencies installed. Ray's pip runtime_env clones the virtualenv a
    node runs before installing into it: this one in 0.1 s, where cloning `.venv` itself copies 6.5 GB of CUDA
    wheels (25-45 s of disk and CPU) on every run of this module."""
    import sysconfig

    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True)
    (site,) = (path / "lib").glob("python*/site-packages")
    (site / "_node_packages.pth").write_text(f"import site; site.addsitedir({sysconfig.get_paths()['purelib']!r})\n")
    return str(path / "bin" / "python")


def _wait(ok, timeout_s: float, what: str) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if ok():
            return
        time.sleep(1)
    raise AssertionError(f"{what} did not come up in {timeout_s} s")


def _api(address: str, path: str, token: str):
    """GET the dashboard's HTTP API with the cluster's token (what `ray job list` / `ray list nodes` call, without
    starting a Python process per poll); None while it does not answer."""
    request = urllib.request.Request(address + path, headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())
    except (OSError, ValueError):
        return None


def _alive_nodes(address: str, token: str) -> int:
    answer = _api(address, "/api/v0/nodes?limit=100", token) or {}
    nodes = ((answer.get("data") or {}).get("result") or {}).get("result") or []
    return sum(n.get("state") == "ALIVE" for n in nodes)


def _job_logs(address: str, token: str, submission_id: str) -> str:
    return (_api(address, f"/api/jobs/{submission_id}/logs", token) or {}).get("logs", "")


def _submit(address: str, client_env: dict, runtime_env: dict, submission_id: str, args: list[str],
            sets: dict[str, str], wait: bool = True):
    """`ray job submit` as jobs/README.md shows it: this checkout as the working dir, a raydecode stage."""
    cmd = [str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", str(ROOT),
           "--submission-id", submission_id, "--runtime-env-json", json.dumps(runtime_env), "--", "raydecode",
           *args] + [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]
    if not wait:
        return subprocess.Popen(cmd, env=client_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    job = subprocess.run(cmd, env=client_env, capture_output=True, text=True, timeout=600)
    assert job.returncode == 0 and "succeeded" in job.stdout.lower(), job.stdout[-4000:] + job.stderr[-2000:]
    return job.stdout


def _runtime_env(env: dict) -> dict:
    # the MLflow server's URI and the S3 endpoint in the runtime environment (credentials come from the nodes)
    return {"env_vars": {k: env[k] for k in ("AWS_ENDPOINT_URL_S3", "AWS_REGION", "MLFLOW_TRACKING_URI")}}


def test_pretrain_waits_for_a_node_then_reads_and_writes_s3_and_logs_to_mlflow(deployment, tmp_path):
    import boto3
    from mlflow.tracking import MlflowClient

    st, env, address, client_env, head_temp, add_node = deployment
    bucket = env["RAYDECODE_BUCKET"]
    ingest = subprocess.run([str(BIN / "raydecode"), "ingest", "synthetic", "--preset", "tiny", "--out",
                             f"{bucket}/store", "--set", "subjects=[1,2,8]", "--set", "timeseries=false"],
                            env={**os.environ, **env}, capture_output=True, text=True, timeout=300)
    assert ingest.returncode == 0, ingest.stderr
    # meanwhile `raydecode submit` runs the info stage with its runtime_env's pip install of this checkout (into a
    # clone of the node's virtualenv: _node_python), checked at the end
    info = subprocess.Popen([str(BIN / "raydecode"), "submit", "info", "--config", str(ROOT / "jobs" / "info.yaml"),
                             "--address", address, "--wait", "--set", f"store={bucket}/store", "--set", "verify=true",
                             "--env", "AWS_ENDPOINT_URL_S3", "--env", "AWS_REGION"],
                            env={**client_env, **env}, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    token = client_env["RAY_AUTH_TOKEN"]
    try:
        # what jobs/README.md tells a user to run: the stage's jobs/ config, the store and checkpoints on S3. One
        # worker per node (STRICT_SPREAD) on a cluster with one worker node: the job waits, saying so in its log,
        # until a second node joins
        sets = {"store": f"{bucket}/store", "checkpoint.storage_path": f"{bucket}/runs", "run_name": "pretrain-job",
                "workdir": str(tmp_path / "job"), "preset": "tiny", "data.subjects": "[1,2]", "optim.epochs": "1",
                "optim.batch_size": "32", "scaling.placement_strategy": "STRICT_SPREAD",
                "checkpoint.every_epochs": "1", "data.read_cpus": "1"}
        job = _submit(address, client_env, _runtime_env(env), "pretrain-job", ["pretrain", "--config",
                                                                               "jobs/pretrain.yaml"], sets, wait=False)
        try:
            _wait(lambda: "waiting up to 600 s for nodes" in _job_logs(address, token, "pretrain-job"), 300,
                  "the job's 'waiting for nodes' line")
            assert job.poll() is None  # still waiting, not refused
            add_node()
            out, err = job.communicate(timeout=600)
        except BaseException:
            job.kill()
            raise
        assert job.returncode == 0, out[-4000:] + err[-2000:]
        assert "succeeded" in out.lower()
        assert "training: waiting up to 600 s for nodes: it needs 2 x {0.25 CPU} + 1 x {1 CPU}, " \
               "the cluster has nodes" in out
        assert "training: the cluster now has nodes" in out
        assert "ZeRO-2" in out and "2 workers" in out

        s3 = boto3.client("s3", endpoint_url=st.s3_endpoint, region_name="us-east-1", aws_access_key_id="testing",
                          aws_secret_access_key="testing")
        keys = {o["Key"] for o in s3.list_objects_v2(Bucket=st.bucket, Prefix="runs/pretrain-job/")["Contents"]}
        assert {"runs/pretrain-job/final/model.safetensors", "runs/pretrain-job/final/metrics.json"} <= keys
        # both ranks wrote their ZeRO-2 partition: one worker per node
        assert any(k.endswith("zero_pp_rank_1_mp_rank_00_optim_states.pt") for k in keys)
        client = MlflowClient(st.tracking_uri)
        (run,) = client.search_runs([client.get_experiment_by_name("raydecode").experiment_id],
                                    "attributes.run_name = 'pretrain-job'")
        assert run.info.status == "FINISHED" and run.data.params["store"] == f"{bucket}/store"
        assert run.data.metrics["retrieval.brain_to_image_top1"] > 0
        assert run.data.tags["raydecode.checkpoint_uri"] == f"{bucket}/runs/pretrain-job/final"
        assert "curves.png" in {a.path for a in client.list_artifacts(run.info.run_id)}

    except BaseException:
        info.kill()
        raise
    out, err = info.communicate(timeout=300)
    assert info.returncode == 0, out[-3000:] + err[-2000:]
    assert "shards match the manifest" in out and "submitted raysubmit_" in out
    # its runtime_env pip-installed the uploaded checkout on the node that ran it (a virtualenv over the node's
    # packages: console script and metadata from this checkout)
    setup = "".join(p.read_text() for p in Path(head_temp).glob("session_*/logs/runtime_env_setup-*.log"))
    assert "Successfully installed raydecode" in setup and "/runtime_resources/working_dir_files/" in setup


def test_embed_evaluate_and_a_sweep_run_as_jobs_on_the_grown_cluster(deployment, tmp_path):
    """The other stages that place work (Ray Data actor pools, Tune trials each running Ray Train) on the same
    cluster, each through `ray job submit`: none decides where to run from one instant's cluster_resources()."""
    from mlflow.tracking import MlflowClient

    st, env, address, client_env, _, _ = deployment
    bucket = env["RAYDECODE_BUCKET"]
    store, model = f"{bucket}/store", f"{bucket}/runs/pretrain-job/final"
    out = _submit(address, client_env, _runtime_env(env), "embed-job", ["embed", "--config", "jobs/embed.yaml"],
                  {"store": store, "workdir": str(tmp_path / "embed"), "encoders": "[openclip-tiny]"})
    assert "openclip-tiny" in out and "images encoded on cpu" in out
    out = _submit(address, client_env, _runtime_env(env), "evaluate-job", ["evaluate", "--config", "jobs/evaluate.yaml"],
                  {"store": store, "workdir": str(tmp_path / "evaluate"), "model": model, "decoder": "null",
                   "protocols": "[averaged]", "tsne": "false", "run_name": "evaluate-job"})
    out = _submit(address, client_env, _runtime_env(env), "sweep-job", ["sweep", "--config", "jobs/sweep.yaml"],
                  {"store": store, "workdir": str(tmp_path / "sweep"), "init_from": model, "preset": "tiny",
                   "checkpoint.storage_path": f"{bucket}/runs", "optim.epochs": "1", "optim.batch_size": "8",
                   "run_name": "sweep-job", "promote": "false"})
    assert "2 trials" in out

    client = MlflowClient(st.tracking_uri)
    (ev,) = client.search_runs([client.get_experiment_by_name("raydecode-evaluate").experiment_id],
                               "attributes.run_name = 'evaluate-job'")
    assert ev.info.status == "FINISHED" and ev.data.metrics["retrieval.brain_to_image_top1"] >= 0
    (sweep,) = client.search_runs([client.get_experiment_by_name("raydecode").experiment_id],
                                  "attributes.run_name = 'sweep-job'")
    trials = client.search_runs([sweep.info.experiment_id], f"tags.mlflow.parentRunId = '{sweep.info.run_id}'")
    assert sweep.info.status == "FINISHED" and len(trials) == 2
    assert all(t.info.status == "FINISHED" and "retrieval.image_to_brain_top1" in t.data.metrics for t in trials)


def test_raydecode_submit_returns_the_job_status_and_needs_the_token(deployment, tmp_path):
    st, env, address, client_env, _, _ = deployment
    cfg = ROOT / "jobs" / "info.yaml"
    # a failing stage: the job's status becomes the exit status, its error line reaches the user
    bad = subprocess.run([str(BIN / "raydecode"), "submit", "info", "--address", address, "--wait",
                          "--env", "AWS_ENDPOINT_URL_S3", "--env", "AWS_REGION",
                          "--set", f"store={env['RAYDECODE_BUCKET']}/nothing"],
                         env={**client_env, **env}, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 1 and "failed" in bad.stderr and "is empty" in bad.stdout
    # no token: refused with one line that says what to set
    no_token = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    refused = subprocess.run([str(BIN / "raydecode"), "submit", "info", "--config", str(cfg), "--address", address],
                             env={**no_token, "HOME": str(tmp_path)}, cwd=ROOT, capture_output=True, text=True,
                             timeout=120)
    lines = refused.stderr.strip().splitlines()
    assert refused.returncode == 2 and len(lines) == 1 and "RAY_AUTH_TOKEN" in lines[0], refused.stderr
