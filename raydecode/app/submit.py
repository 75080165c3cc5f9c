"""``raydecode submit <stage> --config FILE --address URL [--wait]``: a stage as a Ray job, through the Ray Job SDK.

The same as ``ray job submit --address URL --working-dir . -- raydecode <stage> --config FILE``: the config is
validated here first (a bad key fails before anything is uploaded), this checkout is the job's working
directory (so the cluster runs this code), the runtime environment pip-installs it on the nodes (the console
script, and whatever dependency the nodes' image lacks: ``--no-install`` when the image already has the project,
as ``cluster/`` builds it). Only the environment variables the user names with ``--env KEY`` (its value here) or
``--env KEY=VALUE`` travel in the runtime environment: this machine's ``MLFLOW_TRACKING_URI`` is often a
port-forward to localhost that the cluster cannot reach, so nothing is forwarded unasked, and a loopback URL
(in ``--env`` or in the config's ``tracking_uri`` / ``s3.endpoint_url``) sent to a remote cluster is refused.
Credentials come from the nodes (instance profile, service-account role), never from here: a secret-looking
variable or a URL with a password is refused, since Ray shows a job's runtime environment to anyone who can list
jobs. Ray token authentication stays on: the client sends the token from ``RAY_AUTH_TOKEN``,
``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token`` (with ``RAY_AUTH_MODE=token``).
"""

from __future__ import annotations

import ipaddress
import os
import re
import time
from pathlib import Path
from urllib.parse import urlsplit

from raydecode.errors import ConfigError, UserError

# names that hold credentials: they never travel in a runtime_env (the nodes' role provides them)
SECRET_NAME = re.compile(r"SECRET|PASSWORD|PASSWD|TOKEN|CREDENTIAL|PRIVATE|ACCESS_KEY|API_KEY", re.IGNORECASE)
EXCLUDES = [".venv/", "work/", ".git/", "**/__pycache__/", "*.egg-info/", ".pytest_cache/", "build/", "dist/",
            "*.db", "mlruns/"]


class JobFailed(UserError):
    exit_code = 1


def _config_schema(stage: list[str]):
    from raydecode.config import STAGE_CONFIGS

    key = tuple(w for w in stage if not w.startswith("-"))
    if key not in STAGE_CONFIGS or key == ("demo",):
        allowed = ", ".join(" ".join(k) for k in STAGE_CONFIGS if k != ("demo",))
        raise ConfigError(f"stage {' '.join(stage)!r}: allowed values: {allowed}")
    return STAGE_CONFIGS[key]


def entrypoint(stage: list[str], config: str | None, overrides: list[str], root: Path,
               cluster: Cluster | None = None) -> str:
    """``raydecode <stage> --config <path relative to the working dir> [--set k=v ...]``, the config checked here
    (including that its tracking URI and S3 endpoint can be reached from ``cluster``)."""
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
    cfg = load_config(schema, config, overrides)  # fail here, before anything is uploaded
    s3 = getattr(cfg, "s3", None)
    given = [k for k in ("access_key_id", "secret_access_key", "session_token") if s3 and getattr(s3, k)]
    if given:
        raise ConfigError(f"s3.{given[0]} is set in the config: a submitted job's config and command line are "
                          "readable by anyone who can list the cluster's jobs; give credentials to the nodes "
                          "(instance profile, service-account role, a Kubernetes Secret in the pod spec)")
    for what, value in (("tracking_uri", getattr(cfg, "tracking_uri", None)),
                        ("s3.endpoint_url", getattr(getattr(cfg, "s3", None), "endpoint_url", None))):
        if value and cluster is not None:
            check_reachable(what, value, cluster)
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


class Cluster:
    """The job server's address, and whether the cluster behind it runs on this machine. ``ray dashboard`` and
    ``kubectl port-forward`` make a remote cluster's address ``127.0.0.1:8265``, so a loopback address is not
    enough: the nodes' IPs are asked (Ray's state API) and compared with this machine's, once, when it matters."""

    def __init__(self, address: str):
        self.address = address
        self._here: bool | None = None

    @property
    def here(self) -> bool:
        if self._here is None:
            self._here = _loopback(urlsplit(self.address).hostname) and self._nodes_are_local()
        return self._here

    def _nodes_are_local(self) -> bool:
        import socket

        from ray.util.state import list_nodes

        try:
            ips = {n.node_ip for n in list_nodes(address=self.address, limit=1000, raise_on_missing_output=False)}
        except Exception:  # noqa: BLE001 - cannot tell: the submission itself will report an unreachable server
            return True
        local = {"127.0.0.1", "::1"}
        try:
            local |= {a[4][0] for a in socket.getaddrinfo(socket.gethostname(), None)}
        except OSError:
            pass
        try:
            from ray.util import get_node_ip_address

            local.add(get_node_ip_address())
        except Exception:  # noqa: BLE001
            pass
        return bool(ips) and all(ip in local or _loopback(ip) for ip in ips)


def job_env(names: list[str], cluster: Cluster) -> dict[str, str]:
    """The runtime_env ``env_vars`` from ``--env`` items (``KEY``: its value here; ``KEY=VALUE``), checked: no
    secret, no URL with a password, no loopback URL for a cluster that is not on this machine."""
    env: dict[str, str] = {}
    for item in names:
        key, sep, value = item.partition("=")
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            raise ConfigError(f"--env {item!r}: expected KEY or KEY=VALUE")
        if not sep:
            if key not in os.environ:
                raise ConfigError(f"--env {key}: not set in this environment (give --env {key}=VALUE)")
            value = os.environ[key]
        if SECRET_NAME.search(key):
            raise ConfigError(f"--env {key}: looks like a credential; it would be readable by anyone who can list "
                              "the cluster's jobs. Credentials come from the nodes (instance profile, service-account "
                              "role, a Kubernetes Secret in the pod spec)")
        check_reachable(f"--env {key}", value, cluster)
        env[key] = value
    return env


def check_reachable(what: str, value: str, cluster: Cluster) -> None:
    """Refuse a URL with a password, and a URL on this machine (localhost, 127.0.0.0/8, ::1) when the cluster is
    not on this machine."""
    if "://" not in value:
        return
    url = urlsplit(value)
    if url.password:
        raise ConfigError(f"{what}: {url.scheme}://{url.hostname}...: a URL with a password would be readable by "
                          "anyone who can list the cluster's jobs; give the password to the nodes instead")
    if _loopback(url.hostname) and not cluster.here:
        raise ConfigError(f"{what}={value} points at this machine ({url.hostname}); the cluster at {cluster.address} "
                          "runs elsewhere and cannot reach it: give the address its nodes use (e.g. the service's "
                          "in-cluster DNS name)")


def _loopback(host: str | None) -> bool:
    if not host:
        return False
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    return ip.is_loopback or ip.is_unspecified


def runtime_env(root: Path, env: dict[str, str] | None = None, install: bool = True) -> dict:
    """``working_dir`` (this checkout), ``pip`` (installs it: :func:`install_spec`; ``install=False`` when the
    nodes' image already has the project, as cluster/ builds them) and the environment the user named."""
    out = {"working_dir": str(root), "excludes": EXCLUDES, "env_vars": dict(env or {})}
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
           entrypoint_num_cpus: float | None = None, install: bool = True, env: list[str] | None = None) -> dict:
    """Submit; with ``wait``, stream the job's logs until it ends. Returns ``{"job_id", "status"}``; a job that did
    not succeed raises :class:`JobFailed` (exit status 1)."""
    import asyncio

    from ray.job_submission import JobStatus

    root_path = Path(root or os.getcwd()).resolve()
    cluster = Cluster(address)
    command = entrypoint(stage, config, overrides or [], root_path, cluster)
    variables = job_env(env or [], cluster)
    client = _client(address)
    job_id = client.submit_job(entrypoint=command, runtime_env=runtime_env(root_path, variables, install),
                               submission_id=submission_id, entrypoint_num_cpus=entrypoint_num_cpus,
                               metadata={"raydecode.stage": " ".join(stage), "raydecode.config": config or ""})
    print(f"submitted {job_id} to {address}: {command}"
          + (f" (environment: {', '.join(sorted(variables))})" if variables else ""))
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
