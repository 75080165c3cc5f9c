"""``raydecode submit <stage> --config FILE --address URL [--wait]``: a stage as a Ray job, through the Ray Job SDK.

The same as ``ray job submit --address URL --working-dir . -- raydecode <stage> --config FILE``: the config is
validated here first (a bad key fails before anything is uploaded), this checkout is the job's working
directory (so the cluster runs this code), the runtime environment pip-installs it on the nodes (the console
script, and whatever dependency the nodes' image lacks: ``--no-install`` when the image already has the project,
as ``cluster/`` builds it), and the non-secret environment a stage reads (S3 endpoint and region, MLflow
tracking URI) travels in the runtime environment; credentials come from the nodes (instance profile,
service-account role), never from here. Ray token authentication stays on: the client sends the token from
``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token`` (with ``RAY_AUTH_MODE=token``).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from raydecode.errors import ConfigError, UserError

# what a stage reads from its environment, minus secrets
FORWARDED_ENV = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL", "AWS_REGION",
                 "AWS_DEFAULT_REGION", "MLFLOW_TRACKING_URI")
EXCLUDES = [".venv/", "work/", ".git/", "**/__pycache__/", "*.egg-info/", ".pytest_cache/", "build/", "dist/",
            "*.db", "mlruns/"]


class JobFailed(UserError):
    exit_code = 1


def _config_schema(stage: list[str]):
    from raydecode import config as c

    schemas = {("ingest", "synthetic"): c.IngestSyntheticConfig, ("ingest", "nsd"): c.IngestNSDConfig,
               ("ingest", "mindeye2"): c.IngestMindEye2Config, ("embed",): c.EmbedConfig, ("info",): c.InfoConfig,
               ("pretrain",): c.TrainConfig, ("sweep",): c.SweepConfig, ("dynadiff",): c.DiffusionDecodeConfig,
               ("dynadiff", "train"): c.DiffusionDecodeConfig, ("dynadiff", "reconstruct"): c.DiffusionDecodeConfig,
               ("evaluate",): c.EvaluateConfig, ("compare",): c.CompareConfig, ("promote",): c.StageConfig}
    key = tuple(w for w in stage if not w.startswith("-"))
    if key not in schemas:
        allowed = ", ".join(" ".join(k) for k in schemas)
        raise ConfigError(f"stage {' '.join(stage)!r}: allowed values: {allowed}")
    return schemas[key]


def entrypoint(stage: list[str], config: str | None, overrides: list[str], root: Path) -> str:
    """``raydecode <stage> --config <path relative to the working dir> [--set k=v ...]``, the config checked here."""
    import shlex

    from raydecode.config import load_config

    schema = _config_schema(stage)
    parts = ["raydecode", *stage]
    if config is not None:
        path = Path(config).resolve()
        if not path.is_file():
            raise ConfigError(f"config file {config} does not exist")
        try:
            rel = path.relative_to(root)
        except ValueError:
            raise ConfigError(f"config file {config} is outside the working directory {root}: the job could not "
                              "read it") from None
        parts += ["--config", rel.as_posix()]
    load_config(schema, config, overrides)  # fail here, before anything is uploaded
    for o in overrides:
        parts += ["--set", o]
    return " ".join(shlex.quote(p) for p in parts)


def install_spec(root: Path) -> dict:
    """The runtime_env ``pip`` field that installs the uploaded checkout on every node the job touches (its
    ``raydecode`` console script, and any dependency the nodes lack), into a virtualenv on top of the nodes'
    packages. Ray expands ``${RAY_RUNTIME_ENV_CREATE_WORKING_DIR}`` to the unpacked working_dir on each node.
    Ray caches the environment by this spec, so the digest of pyproject.toml rides along (as a build setting the
    backend ignores): a changed dependency list builds a new environment, the same one reuses it. The code itself
    always comes from the working_dir, which is first on the job's path."""
    import hashlib

    pyproject = root / "pyproject.toml"
    if not pyproject.is_file():
        raise ConfigError(f"{pyproject} does not exist: installing the project needs its checkout as the working "
                          "directory (or --no-install)")
    digest = hashlib.sha256(pyproject.read_bytes()).hexdigest()[:16]
    return {"packages": ["${RAY_RUNTIME_ENV_CREATE_WORKING_DIR}"],
            "pip_install_options": ["--no-build-isolation", "--config-settings", f"raydecode-pyproject={digest}"]}


def runtime_env(root: Path, extra_env: dict[str, str] | None = None, install: bool = True) -> dict:
    """``working_dir`` (this checkout), ``pip`` (installs it: :func:`install_spec`; ``install=False`` when the
    nodes' image already has the project, as cluster/ builds them) and the forwarded non-secret environment."""
    env = {k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)}
    out = {"working_dir": str(root), "excludes": EXCLUDES, "env_vars": {**env, **(extra_env or {})}}
    if install:
        out["pip"] = install_spec(root)
    return out


def _client(address: str):
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except Exception as exc:  # noqa: BLE001 - connection and auth errors arrive as several types
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if "401" in msg or "nauthenticated" in msg or "uthoriz" in msg or "token" in msg.lower():
            raise ConfigError(f"the Ray cluster at {address} refused the request ({msg}): it uses token "
                              "authentication; set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN (or ~/.ray/auth_token; "
                              "`ray get-auth-token` on the head node prints it)") from None
        raise ConfigError(f"cannot reach the Ray job server at {address}: {msg}") from None


def submit(stage: list[str], config: str | None, address: str, overrides: list[str] | None = None,
           wait: bool = False, submission_id: str | None = None, root: str | None = None,
           entrypoint_num_cpus: float | None = None, install: bool = True) -> dict:
    """Submit; with ``wait``, stream the job's logs until it ends. Returns ``{"job_id", "status"}``; a job that did
    not succeed raises :class:`JobFailed` (exit status 1)."""
    import asyncio

    from ray.job_submission import JobStatus

    root_path = Path(root or os.getcwd()).resolve()
    command = entrypoint(stage, config, overrides or [], root_path)
    client = _client(address)
    job_id = client.submit_job(entrypoint=command, runtime_env=runtime_env(root_path, install=install),
                               submission_id=submission_id, entrypoint_num_cpus=entrypoint_num_cpus,
                               metadata={"raydecode.stage": " ".join(stage), "raydecode.config": config or ""})
    print(f"submitted {job_id} to {address}: {command}")
    if not wait:
        print(f"follow: ray job logs --address {address} --follow {job_id}\n"
              f"stop:   ray job stop --address {address} {job_id}")
        return {"job_id": job_id, "status": str(client.get_job_status(job_id))}

    async def tail():
        async for lines in client.tail_job_logs(job_id):
            print(lines, end="", flush=True)

    try:
        asyncio.run(tail())
    except KeyboardInterrupt:
        print(f"\nstopped following {job_id} (it keeps running; `ray job stop --address {address} {job_id}`)")
        raise
    status = client.get_job_status(job_id)
    for _ in range(50):  # the log stream can close a moment before the status is final
        if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            break
        time.sleep(0.2)
        status = client.get_job_status(job_id)
    if status != JobStatus.SUCCEEDED:
        lines = (client.get_job_info(job_id).message or "").strip().splitlines()
        raise JobFailed(f"job {job_id} {status.value.lower()}" + (f": {lines[-1]}" if lines else ""))
    return {"job_id": job_id, "status": status.value}
