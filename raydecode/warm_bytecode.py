"""``python -m raydecode.warm_bytecode``: write the bytecode of what raydecode's processes import (``make install``).

Every Ray worker is a fresh interpreter. Where ``PYTHONDONTWRITEBYTECODE`` is set (CI machines, some containers)
none of them may cache bytecode, so each would compile torch, Ray, DeepSpeed, diffusers, ... from source again:
~20 s of imports per process instead of ~8 s on 2 cores. Importing those modules once here, with bytecode writing
turned back on, compiles exactly the modules that are used (about 25 s), where compiling the whole environment
(``uv pip install --compile-bytecode``) takes about 50 s.
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
    "raydecode.cli", "raydecode.train.loop", "raydecode.train.launch", "raydecode.tune", "raydecode.reconstruct",
    "raydecode.evaluate.suite", "raydecode.data.embed", "raydecode.submit",
]

# whole packages, compiled without importing them (a few seconds): what is loaded lazily or only in processes
# raydecode starts but does not import into. Ray's dashboard, agents, job supervisor and CLI on every node (a
# cluster's first job otherwise compiles them in each), diffusers' lazily loaded models and schedulers, MLflow's
# server and pyfunc flavours, and the local stack's servers (moto's S3, uvicorn).
TREES = ["ray", "diffusers", "mlflow", "peft", "deepspeed", "open_clip", "moto.core", "moto.s3", "moto.server",
         "moto.moto_server", "uvicorn", "starlette", "fastapi", "flask", "werkzeug"]


def _compile_trees() -> list[str]:
    import compileall
    import importlib.util

    missing = []
    for name in TREES:
        try:
            spec = importlib.util.find_spec(name)
        except ImportError:
            spec = None
        if spec is None:
            missing.append(name)
        elif spec.submodule_search_locations:
            for path in spec.submodule_search_locations:
                compileall.compile_dir(path, quiet=1, workers=0)
        elif spec.origin:
            compileall.compile_file(spec.origin, quiet=1)
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
