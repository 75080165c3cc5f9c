"""Where work can run: what a stage asks of the cluster, checked against the nodes the cluster *can* have.

A GPU cluster autoscales: its head has no CPUs for jobs and its GPU workers scale up from zero, so what
``ray.cluster_resources()`` reports at one instant says nothing about what a job will get. Stages therefore ask for
what their config says (Ray Train's placement group, Ray Data's actor pools, Tune's trials) and let Ray's autoscaler
bring the nodes; this module only refuses what can *never* run, instead of letting it wait forever:

- with an autoscaler (KubeRay, the cluster launcher), its node types and their ``max_count`` are what the cluster can
  have: a request no combination of them holds is refused at once;
- without one (``ray start`` by hand, a local Ray), the nodes alive now are what it can have, and more may be started
  by hand: a request that does not fit waits up to ``wait_for_nodes_s`` (saying so in the job's log, and asking an
  autoscaler for the nodes with ``request_resources`` in case one exists that keeps no node types in the GCS), then
  is refused with one line that names the setting to change.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

from raydecode.errors import ConfigError

log = logging.getLogger(__name__)

Bundle = dict[str, float]
# an autoscaler node type with no max_count (-1) stands for this many nodes in a fit check
UNBOUNDED_NODES = 1024
_TRACKED = ("CPU", "GPU", "memory")


@dataclass(frozen=True)
class Demand:
    """Bundles a stage holds at once: ``strategy`` applies to ``bundles`` (Ray's placement strategies), ``extra``
    (Ray Data's tasks, ...) go wherever they fit beside them."""

    what: str
    bundles: list[Bundle]
    strategy: str = "PACK"
    extra: list[Bundle] = field(default_factory=list)
    hint: str = "lower the request or add nodes"

    def describe(self) -> str:
        return " + ".join(_describe_bundles(b) for b in (self.bundles, self.extra) if b)


@dataclass(frozen=True)
class ClusterShape:
    """The nodes the cluster can have (one resources dict per node) and where that came from."""

    nodes: list[Bundle]
    source: str  # "autoscaler": its node types x max_count; "alive": the nodes up now (no autoscaler config)

    @property
    def autoscaling(self) -> bool:
        return self.source == "autoscaler"

    def total(self, key: str) -> float:
        return float(sum(n.get(key, 0.0) for n in self.nodes))

    def has(self, key: str) -> bool:
        return any(n.get(key, 0.0) > 0 for n in self.nodes)

    def describe(self) -> str:
        if not self.nodes:
            return "no nodes"
        kinds: dict[str, int] = {}
        for n in self.nodes:
            kinds[_describe_bundle(n)] = kinds.get(_describe_bundle(n), 0) + 1
        what = "node types" if self.autoscaling else "nodes"
        return f"{what} " + ", ".join(f"{c} x {k}" for k, c in kinds.items())


def started_here() -> bool:
    """Whether this process started the Ray it is connected to (``ray.init()`` without an address: a machine's
    local Ray, which never gains nodes) rather than joining a cluster."""
    try:
        import ray._private.worker as worker

        node = worker._global_node  # a private Ray attribute: the head node object of a Ray this process started
        return node is not None and bool(node.is_head())
    except Exception:  # noqa: BLE001 - another Ray version: assume a cluster that may grow (the bounded wait)
        return False


def cluster_shape() -> ClusterShape:
    """The connected Ray cluster's possible nodes: the autoscaler's node types (as Ray Train's own check reads them)
    when the GCS holds an autoscaler config, else the nodes alive now."""
    import ray

    nodes: list[Bundle] = []
    config = _autoscaler_config()
    if config is not None:
        for group in config.node_group_configs:
            count = group.max_count if group.max_count >= 0 else UNBOUNDED_NODES
            nodes += [_tracked(dict(group.resources))] * min(count, UNBOUNDED_NODES)
        if nodes:
            return ClusterShape(nodes, "autoscaler")
    return ClusterShape([_tracked(n["Resources"]) for n in ray.nodes() if n.get("Alive")], "alive")


def _autoscaler_config():
    """The autoscaler's cluster config from the GCS (KubeRay and the launcher with autoscaler v2 write it); None
    without an autoscaler. A private Ray API: Ray Train and Ray Data read it the same way."""
    try:
        from ray._private.state import state

        return state.get_cluster_config()
    except Exception:  # noqa: BLE001 - an older/newer Ray without it: fall back to the alive nodes
        return None


def fits(demand: Demand, nodes: Sequence[Bundle]) -> bool:
    """Whether ``demand``'s bundles can all be placed at once on ``nodes`` (first fit, largest bundles first)."""
    free = [dict(n) for n in nodes]

    def place(bundle: Bundle, candidates: list[int]) -> int | None:
        for i in candidates:
            if all(free[i].get(k, 0.0) + 1e-9 >= v for k, v in bundle.items() if v > 0):
                for k, v in bundle.items():
                    free[i][k] = free[i].get(k, 0.0) - v
                return i
        return None

    order = sorted(demand.bundles, key=_size, reverse=True)
    if demand.strategy == "STRICT_PACK":
        merged: Bundle = {}
        for b in order:
            for k, v in b.items():
                merged[k] = merged.get(k, 0.0) + v
        order = [merged] if order else []
    used: set[int] = set()
    for bundle in order:
        allowed = [i for i in range(len(free)) if i not in used] if demand.strategy == "STRICT_SPREAD" else \
            list(range(len(free)))
        i = place(bundle, allowed)
        if i is None:
            return False
        used.add(i)
    return all(place(b, list(range(len(free)))) is not None for b in sorted(demand.extra, key=_size, reverse=True))


def require(demand: Demand, wait_for_nodes_s: float, *, say: Callable[[str], None] = print,
            poll_s: float = 2.0) -> ClusterShape:
    """Return once the cluster can hold ``demand``; raise :class:`ConfigError` if it never can.

    With an autoscaler the answer is immediate (its node types decide; the stage's own request then brings the nodes).
    Without one, the job waits up to ``wait_for_nodes_s`` for nodes to join, saying so every 30 s."""
    shape = cluster_shape()
    if fits(demand, shape.nodes):
        return shape
    if shape.autoscaling:
        raise ConfigError(f"{demand.what} needs {demand.describe()}: no combination of the autoscaler's "
                          f"{shape.describe()} can ever hold it; {demand.hint}")
    if started_here():
        raise ConfigError(f"{demand.what} needs {demand.describe()}: the Ray this process started on this machine "
                          f"has {shape.describe()} and no node will join it; {demand.hint}")
    t0 = time.time()
    _request_nodes(demand)
    try:
        said = -1e9
        while True:
            waited = time.time() - t0
            if waited - said >= 30:
                say(f"{demand.what}: waiting up to {wait_for_nodes_s:.0f} s for nodes: it needs {demand.describe()}, "
                    f"the cluster has {shape.describe()} ({waited:.0f} s so far)")
                said = waited
            if waited >= wait_for_nodes_s:
                raise ConfigError(
                    f"{demand.what} needs {demand.describe()}; the cluster has {shape.describe()} and no node that "
                    f"fits joined in {waited:.0f} s (wait_for_nodes_s); {demand.hint}")
            time.sleep(poll_s)
            shape = cluster_shape()
            if fits(demand, shape.nodes):
                say(f"{demand.what}: the cluster now has {shape.describe()}, starting after {waited:.0f} s")
                return shape
    finally:
        _request_nodes(None)


def _request_nodes(demand: Demand | None) -> None:
    """Ask an autoscaler (if one runs without publishing its node types) for the demand's nodes; None withdraws it."""
    try:
        from ray.autoscaler.sdk import request_resources

        request_resources(bundles=[] if demand is None else [_ray_bundle(b) for b in demand.bundles + demand.extra])
    except Exception as exc:  # noqa: BLE001 - no autoscaler to ask is the common case of a hand-started cluster
        log.debug("request_resources: %s", exc)


def _ray_bundle(b: Bundle) -> dict[str, float]:
    return {k: v for k, v in b.items() if v > 0 and k != "memory"}


def _tracked(resources: dict) -> Bundle:
    return {k: float(v) for k, v in resources.items() if k in _TRACKED}


def _size(b: Bundle) -> tuple:
    return tuple(b.get(k, 0.0) for k in ("GPU", "CPU", "memory"))


def _describe_bundle(b: Bundle) -> str:
    parts = [f"{b[k]:g} {k}" for k in ("GPU", "CPU") if b.get(k)]
    if b.get("memory"):
        parts.append(f"{b['memory'] / 2**30:.0f} GB")
    return "{" + ", ".join(parts or ["nothing"]) + "}"


def _describe_bundles(bundles: list[Bundle]) -> str:
    kinds: dict[str, int] = {}
    for b in bundles:
        kinds[_describe_bundle(b)] = kinds.get(_describe_bundle(b), 0) + 1
    return " + ".join(f"{c} x {k}" for k, c in kinds.items())


# -- paths ---------------------------------------------------------------------------------------------------------

PATH_FIELDS = ("store", "init_from", "checkpoint_uri")


def absolute(uri: str) -> str:
    """A local path (no scheme) made absolute; a URI with a scheme unchanged."""
    return uri if "://" in uri else os.path.abspath(uri)


def absolute_paths(cfg):
    """A stage config whose local paths (``workdir``, ``store``, ``init_from``, ``checkpoint_uri``) are absolute:
    Ray's tasks and workers run in Ray's own working directory, so paths are resolved before they leave the driver."""
    update = {"workdir": os.path.abspath(cfg.workdir)}
    for name in PATH_FIELDS:
        value = getattr(cfg, name, None)
        if value:
            update[name] = absolute(value)
    return cfg.model_copy(update=update)


# -- seeds -----------------------------------------------------------------------------------------------------------


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Torch's CPU generator set to ``seed`` inside the block and restored after it: a module built inside gets the
    same random weights whatever ran before (frozen random-weight encoders, UNets, metric networks)."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def row_seeds(seed: int, subjects, image_ids):
    """One noise seed per (subject, image): the same reconstruction whatever the batching or the worker."""
    import numpy as np

    return np.asarray([np.random.SeedSequence([seed, int(s), int(i)]).generate_state(1)[0]
                       for s, i in zip(subjects, image_ids)], np.int64)


# -- the Ray session ----------------------------------------------------------------------------------------------

# A local Ray keeps idle worker processes for a minute instead of Ray's one second: each training run's Ray Data
# tasks and Ray Train actors then reuse workers that already imported pyarrow and torch instead of starting new
# ones (a tiny training run on 2 cores: 28 s instead of 32 s wall, 48 s instead of 55 s CPU; `RAY_<key>` overrides)
LOCAL_SYSTEM_CONFIG = {"idle_worker_killing_time_threshold_ms": 60_000}
# run first in every worker process of a job raydecode starts (by module path: workers import it themselves)
WORKER_SETUP_HOOK = "raydecode.runtime.quiet_worker"
# messages third-party code prints in every worker and a user cannot act on (their text stays in Ray's log files)
_WORKER_NOISE = (
    "Progress bars disabled",  # Ray Data, when a stage turns its bars off for a progress line of its own
    "`ExecutionOptions.exclude_resources` is deprecated",  # Ray Train's own use of Ray Data (Ray 2.60)
    "`torch.distributed.all_gather_into_tensor` is deprecated",  # DeepSpeed's ZeRO (torch 2.14)
)


def local_system_config() -> dict:
    return {k: v for k, v in LOCAL_SYSTEM_CONFIG.items() if f"RAY_{k}" not in os.environ}


def init_ray(address: str | None = None) -> None:
    """Connect to ``address`` (or ``RAY_ADDRESS``), or start a local Ray if neither is set. Every worker process of
    the job runs :func:`quiet_worker` first (merged into a submitted job's runtime env)."""
    import ray

    if ray.is_initialized():  # e.g. a sweep trial's task running a training stage: its Ray Data output too
        _ray_data_to_its_log_file()
        return
    require_token_auth()  # before ray.init reads it
    address = address or os.environ.get("RAY_ADDRESS")
    runtime_env = {"worker_process_setup_hook": WORKER_SETUP_HOOK}
    if address:
        ray.init(address=address, log_to_driver=True, runtime_env=runtime_env)
    else:
        # the dashboard serves the state API, which Ray Train's placement-group cleaner polls every second
        ray.init(include_dashboard=True, log_to_driver=True, configure_logging=True, logging_level="warning",
                 runtime_env=runtime_env, _system_config=local_system_config())
    _ray_data_to_its_log_file()


def require_token_auth() -> None:
    """Ray's token authentication, set explicitly (a local Ray generates its token in ``~/.ray/auth_token``; a client
    reads ``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH`` or that file): a cluster anyone on the network can run code on
    is not something raydecode starts or joins."""
    mode = os.environ.get("RAY_AUTH_MODE")
    if mode is not None and mode.lower() != "token":
        raise ConfigError(f"RAY_AUTH_MODE={mode}: raydecode runs Ray only with token authentication "
                          "(unset it or set RAY_AUTH_MODE=token)")
    if mode is None:
        os.environ["RAY_AUTH_MODE"] = "token"
        if "ray._raylet" in sys.modules:  # Ray read its config when imported: have it read the mode again
            from ray._raylet import Config

            Config.initialize("")


def quiet_worker() -> None:
    """A job's ``worker_process_setup_hook``: what every task and actor prints reaches the driver's console, so a
    worker keeps its console for warnings and the stages' own progress lines. Ray Data's progress goes to its log
    file, libraries' INFO chatter (open_clip's model construction) and the warnings in ``_WORKER_NOISE`` are dropped
    from the console; Ray keeps each worker's full output in its log directory."""
    import warnings

    for text in _WORKER_NOISE:
        warnings.filterwarnings("ignore", message=re.escape(text))
    logging.getLogger().setLevel(logging.WARNING)
    _ray_data_to_its_log_file()


class _DropNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not any(text in record.getMessage() for text in _WORKER_NOISE)


def _ray_data_to_its_log_file() -> None:
    """Ray Data logs each dataset's progress at INFO every few seconds when stdout is not a terminal (hundreds of
    lines per stage, e.g. under `ray job submit` or `make demo`): its console handler keeps warnings only, its log
    file (ray_logs_dir()/ray-data.log) keeps everything; the stages print their own progress and summaries."""
    import ray.data  # noqa: F401 - configures Ray Data's loggers

    for handler in logging.getLogger("ray.data").handlers:
        if "File" not in type(handler).__name__:
            handler.setLevel(logging.WARNING)
            if not any(isinstance(f, _DropNoise) for f in handler.filters):
                handler.addFilter(_DropNoise())


def ray_logs_dir() -> str:
    """This node's Ray session log directory (Ray Data's ray-data.log, the workers' output)."""
    try:
        import ray._private.worker

        return os.path.join(ray._private.worker._global_node.get_session_dir_path(), "logs")
    except Exception:  # noqa: BLE001 - a private API: Ray's default location otherwise
        return "/tmp/ray/session_latest/logs"
