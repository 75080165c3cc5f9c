"""``python tools/warm_bytecode.py``: write the bytecode of what raydecode's processes import (``make install``).

Every Ray worker is a fresh interpreter. Where ``PYTHONDONTWRITEBYTECODE`` is set (CI machines, some containers)
none of them may cache bytecode, so each would compile torch, Ray, DeepSpeed, diffusers, ... from source again:
~20 s of imports per process instead of ~8 s on 2 cores. Importing those modules once here, with bytecode writing
turned back on, and compiling the packages they load lazily (``TREES``) takes about 40 s, where compiling the whole
environment (416 MB of source) takes minutes.
"""

from __future__ import annotations

import importlib
import os
import sys
import time

MODULES = [
    # Ray: the driver, Train workers and controller, Tune trials, Data tasks, the job server client
    "ray", "ray.train.torch", "ray.tune", "ray.tune.search.optuna", "ray.data", "ray.job_submission",
    # training: torch + DeepSpeed, the methods' diffusers / peft / open_clip parts
    "torch", "torch.distributed", "deepspeed", "diffusers", "diffusers.models.autoencoders.vae", "peft",
    "transformers", "open_clip", "safetensors.torch",
    # data, tracking, evaluation
    "pyarrow.parquet", "pyarrow.fs", "pydantic", "mlflow", "mlflow.pyfunc", "mlflow.tracking", "sklearn.metrics",
    "sklearn.manifold", "scipy.stats", "matplotlib.pyplot", "PIL.Image", "yaml", "tqdm",
    # raydecode itself
    "raydecode.app.cli", "raydecode.train.loop", "raydecode.train.launch", "raydecode.sweep", "raydecode.diffusion_decode",
    "raydecode.evaluate.suite", "raydecode.embed", "raydecode.app.submit",
    # release ingests (their Ray tasks read HDF5, NIfTI and MAT files)
    "raydecode.data.nsd", "raydecode.data.mindeye2", "h5py", "nibabel", "scipy.io",
]

# whole packages, compiled without importing them (a few seconds): what is loaded lazily or only in processes
# raydecode starts but does not import into. Found by recording every source compile (an audit hook on "compile")
# of a fresh clone's test run: without these, its processes compiled 330 MB of source (the suite took 773 s
# instead of ~590 s).
TREES = [
    # raydecode itself (its editable install is found through setuptools' finder, not a sys.path entry)
    "raydecode",
    # Ray's dashboard, agents, job supervisor and CLI on every node, and what they load: gRPC, OpenTelemetry,
    # OpenCensus, Prometheus, aiohttp's CORS, psutil, click
    "ray", "grpc", "opentelemetry", "opencensus", "prometheus_client", "aiohttp_cors", "psutil", "click",
    # DeepSpeed's engine set-up loads torch.compile's machinery (inductor, functorch, ...) and setuptools
    "deepspeed", "torch._inductor", "torch._functorch", "torch._dynamo", "torch._export", "torch.export", "torch.ao",
    "torch.fx", "torch.utils", "torch._library", "torch._subclasses", "networkx", "setuptools",
    # diffusers' lazily loaded models and schedulers, peft, open_clip
    "diffusers", "peft", "open_clip",
    # MLflow: the client's sqlite store (SQLAlchemy + Alembic migrations), the server, pyfunc flavours, GitPython
    "mlflow", "sqlalchemy", "alembic", "mako", "huey", "git", "gitdb", "docker", "pydantic", "pygments", "anyio",
    "packaging", "platformdirs", "PIL", "pyarrow", "fsspec", "cryptography",
    # the local stack's servers: moto's S3 (and the IAM policies it loads), uvicorn, flask
    "moto.core", "moto.s3", "moto.iam", "moto.server", "moto.moto_server", "uvicorn", "starlette", "fastapi",
    "flask", "flask_cors", "werkzeug", "itsdangerous", "blinker",
]


def _locations(name: str) -> list[str]:
    """Every copy of package ``name`` the environment holds: a top-level name can be on ``sys.path`` twice (Ray
    puts its vendored ``ray/thirdparty_files`` first, which has its own psutil; Ray's node services import the
    site-packages one), and each copy needs its bytecode."""
    import importlib.machinery
    import importlib.util

    try:
        if "." in name:
            specs = [importlib.util.find_spec(name)]
        else:  # each sys.path entry on its own (PathFinder also finds namespace packages' portions)
            specs = [importlib.machinery.PathFinder.find_spec(name, [entry]) for entry in dict.fromkeys(sys.path)]
            if not any(specs):  # an editable install's own finder (raydecode, installed with `pip install -e`)
                specs = [importlib.util.find_spec(name)]
    except ImportError:
        return []
    found = []
    for spec in filter(None, specs):
        found += spec.submodule_search_locations or ([spec.origin] if spec.origin else [])
    return list(dict.fromkeys(found))


def _compile_trees() -> list[str]:
    import compileall

    missing = []
    for name in TREES:
        paths = _locations(name)
        if not paths:
            missing.append(name)
        for path in paths:
            if os.path.isdir(path):
                compileall.compile_dir(path, quiet=1, workers=0)
            else:
                compileall.compile_file(path, quiet=1)
    return missing


def main() -> int:
    sys.dont_write_bytecode = False  # PYTHONDONTWRITEBYTECODE only sets the default
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed probes for an accelerator on import
    os.environ.setdefault("MPLBACKEND", "Agg")
    t0 = time.time()
    failed = []
    for name in MODULES:
        try:
            importlib.import_module(name)
        except Exception as exc:  # noqa: BLE001 - an optional extra missing must not fail the install
            failed.append(f"{name} ({type(exc).__name__})")
    failed += _compile_trees()
    print(f"bytecode written for {len(MODULES)} modules and their imports and {len(TREES)} packages in "
          f"{time.time() - t0:.0f} s" + (f"; not found: {', '.join(failed)}" if failed else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
