"""The paper-scale data path: can Ray Data, from local disk or S3, deliver what one GPU consumes at 40 % MFU?

    .venv/bin/python benchmarks/bench_datapath.py [--workers 1] [--epochs 3] [--batch 32] [--workdir work/bench]

Writes a paper-shaped store (``raydecode.data.synthetic`` preset ``paper`` cut to one subject and one session: NSD
subject 1's 15,724 voxels, 750 trials of 250 images, stimuli at 425 px in 10 shards of 25, so that the lookup's
default LRU of 4 decoded shards meets a random trial order as NSD's 146 shards of 500 meet a cache of 2-4) plus, as
an embeddings column, MindEye2's CLIP target precomputed in OpenCLIP ViT-bigG/14's shape (256 x 1664 float16 tokens,
852 KB an image, and the 1280-d pooled vector); copies it to an S3 server (moto on 127.0.0.1); then streams its train
split into Ray Train workers as the train loop does (``trials_dataset`` -> ``streaming_split`` ->
``iter_torch_batches`` with the loop's collate, no materialize) and measures samples/s and MB/s per worker over the
epochs after the first, for:

- ``betas``: the betas alone (what every variant carries);
- ``betas+images``: and the 425-px images, for targets computed on the GPU (a ViT-bigG forward per image);
- ``betas+tokens``: and the precomputed bigG tokens joined from the store (MindEye2's paper setup);
- ``images+cache`` / ``tokens+cache``: the same through ``data.local_cache`` (decoded once per node into
  memory-mapped files, which the first epoch fills);

from local disk and from S3. An uncached join decodes every stimulus shard a block of trials falls in, once per
block: here 250 images for a block of ~750 trials, at NSD's scale ~73k for a session's 750 (all 146 shards of 500),
so the uncached rates measured here are upper bounds there (the output prints the arithmetic).

The consumption rate of one GPU is derived from FLOPs counted with ``torch.utils.flop_counter`` (MindEye2's paper
model built at the ``paper`` preset, one forward of its losses; a training step ~ 3x the forward; bigG's visual tower
and the ConvNeXt-XL augmented target on meta tensors): rate = 989 TFLOP/s (H100/H200 dense bf16) x 0.40 / FLOPs per
sample (the count, ~35 s, is kept in ``--workdir`` per hash of the model's sources). Headroom = delivered /
consumed per worker; > 1 means the data path keeps that GPU fed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

ENCODER = "bigg-shaped"
TOKENS, POOLED = (256, 1664), 1280
PEAK_TFLOPS = 989.0  # H100 SXM / H200, dense bf16
MFU = 0.40
NSD_DECODES_PER_TRIAL = 146 * 500 / 750  # a session's trials fall in nearly every one of NSD's 146 stimulus shards
VARIANTS = {"betas": {}, "betas+images": {"images": True}, "betas+tokens": {"embeddings": [ENCODER]},
            "images+cache": {"images": True, "local_cache": True}, "tokens+cache": {"embeddings": [ENCODER],
                                                                                   "local_cache": True}}

FLOPS = """
import torch
from torch.utils.flop_counter import FlopCounterMode
import open_clip
from open_clip.model import _build_vision_tower
from raydecode.methods.spec import Progress, get_method
from raydecode.modelinfo.info import dataset_info
from raydecode.modelinfo.memory import fake_batch
from raydecode.nn.convnext import ARCHS, ConvNeXtTarget

def count(fn):
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        fn()
    return fc.get_total_flops()

torch.set_num_threads(2)
spec = get_method("mindeye2")
mcfg, info = spec.config("paper"), dataset_info("paper", None)
torch.manual_seed(0)
model = spec.build_model(mcfg, info)  # real tensors: the losses branch on values (mixco's subjects)
batch = fake_batch(spec, mcfg, info, 2)
fwd = count(lambda: spec.loss(model, batch, Progress(0, 1, 0, 10))) / 2
params = sum(p.numel() for p in model.parameters())
del model, batch
cfg = open_clip.get_model_config("ViT-bigG-14")
with torch.device("meta"):
    tower = _build_vision_tower(cfg["embed_dim"], cfg["vision_cfg"])
    cnx = ConvNeXtTarget(ARCHS["xlarge"])
    x = torch.randn(1, 3, 224, 224)
print(params, fwd, count(lambda: tower(x)), count(lambda: cnx(x)))
"""


# what the FLOP count depends on: the paper model's code and presets, the encoders' architectures, the versions
MODEL_SOURCES = ("raydecode/methods", "raydecode/nn", "raydecode/modelinfo", "raydecode/config.py",
                 "raydecode/data/synthetic.py")


def flops(cache_dir: str | None = None) -> dict:
    """FLOPs per sample, counted in a child process (the paper model holds ~10 GB while it is counted: ~35 s), or
    read from ``cache_dir`` where a count of the same sources (:data:`MODEL_SOURCES`, torch, open_clip) is kept."""
    import hashlib
    import importlib.metadata as md

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    h = hashlib.sha256(FLOPS.encode())
    for src in MODEL_SOURCES:
        path = os.path.join(root, src)
        files = [path] if path.endswith(".py") else sorted(
            os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs if f.endswith((".py", ".json", ".yaml")))
        for f in files:
            h.update(os.path.relpath(f, root).encode() + open(f, "rb").read())
    h.update(f"{md.version('torch')} {md.version('open_clip_torch')}".encode())
    cached = os.path.join(cache_dir, f"flops-{h.hexdigest()[:16]}.json") if cache_dir else None
    if cached and os.path.exists(cached):
        with open(cached) as f:
            return json.load(f)
    out = subprocess.run([sys.executable, "-c", FLOPS], capture_output=True, text=True, check=True)
    params, fwd, bigg, cnx = (float(v) for v in out.stdout.split()[-4:])
    result = {"params": params, "forward": fwd, "bigg": bigg, "convnext": cnx}
    if cached:
        with open(cached + ".tmp", "w") as f:
            json.dump(result, f)
        os.replace(cached + ".tmp", cached)
    return result


def make_store(root: str) -> str:
    """The paper-shaped store under ``root`` (kept between runs: the 425-px stimuli take ~20 s)."""
    from raydecode.data.ingest import run_ingest, synthetic_plan
    from raydecode.data.schema import EncoderInfo
    from raydecode.data.store import StoreWriter, open_store
    from raydecode.data.synthetic import PRESETS
    from raydecode.embed import _embeddings_table, shard_path

    PRESETS["paper-shape"] = PRESETS["paper"].model_copy(update={
        "name": "paper-shape", "voxels": PRESETS["paper"].voxels[:1], "sessions": (1,), "n_shared": 50,
        "n_unique": 200, "images_per_shard": 25})
    uri = os.path.join(root, "paper-shape-10")
    if not os.path.exists(os.path.join(uri, "manifest.json")) or ENCODER not in open_store(uri).manifest.embeddings:
        t0 = time.time()
        run_ingest(synthetic_plan("paper-shape", 0, timeseries=False), uri, progress=False)
        store = open_store(uri)
        info = EncoderInfo(name=ENCODER, tokens_shape=TOKENS, pooled_dim=POOLED, kind="openclip",
                           arch="ViT-bigG-14", image_size=224, seed=0)
        writer = StoreWriter.extending(store)
        rng = np.random.default_rng(0)
        for sh in store.manifest.shards_of("stimuli"):
            ids = store.read_shard(sh, ["image_id"])["image_id"].to_numpy()
            tokens = rng.standard_normal((len(ids), *TOKENS), np.float32).astype(np.float16)
            pooled = rng.standard_normal((len(ids), POOLED), np.float32).astype(np.float16)
            writer.write_shard(shard_path(ENCODER, sh), "embeddings", _embeddings_table(ids, tokens, pooled, info),
                               encoder_info=info, encoder=ENCODER, image_id_min=sh.image_id_min,
                               image_id_max=sh.image_id_max)
        writer.commit(embeddings={ENCODER: info})
        print(f"[bench] wrote the paper-shaped store {uri} in {time.time() - t0:.0f} s", flush=True)
    return uri


def to_s3(local: str, endpoint: str, bucket: str) -> str:
    import pyarrow.fs as pafs

    from raydecode.storage import S3Options, resolve

    uri = f"s3://{bucket}/{os.path.basename(local)}"
    dst = resolve(uri, S3Options(endpoint_url=endpoint))
    pafs.copy_files(local, dst.path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=dst.fs)
    return uri


def consume(config: dict) -> None:
    """Ray Train's loop: iterate the worker's split as the train loop does; rank 0 reports per-epoch rates."""
    import ray.train

    from raydecode.train.loop import numpy_collate

    shard = ray.train.get_dataset_shard("train")
    epochs = []
    for _ in range(config["epochs"]):
        t0, rows, nbytes = time.perf_counter(), 0, 0
        for batch in shard.iter_torch_batches(batch_size=config["batch"], drop_last=True, collate_fn=numpy_collate()):
            rows += len(batch["betas"])
            nbytes += sum(v.numel() * v.element_size() for v in batch.values())
        dt = time.perf_counter() - t0
        epochs.append({"rows_per_s": rows / dt, "mb_per_s": nbytes / dt / 1e6, "kb_per_row": nbytes / max(1, rows) / 1e3})
    if ray.train.get_context().get_world_rank() == 0:  # one machine: the driver reads it (Ray Train V2's result
        with open(config["out"], "w") as f:            # keeps only checkpointed metrics)
            json.dump(epochs, f)


def stream(store: str, s3, variant: str, workers: int, epochs: int, batch: int, storage: str) -> dict:
    from ray.train import DataConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from raydecode.config import DataSelection
    from raydecode.data.pipeline import trials_dataset

    options = dict(VARIANTS[variant])
    if options.pop("local_cache", False):  # a fresh node-local cache: the first epoch fills it, the others map it
        options["local_cache"] = os.path.join(storage, f"cache-{variant}")
    sel = DataSelection(categories=False, read_cpus=0.25, **options)
    ds = trials_dataset(store, "train", sel, s3).dataset
    out = os.path.join(storage, f"{variant}.json")
    TorchTrainer(consume, train_loop_config={"epochs": epochs, "batch": batch, "out": out},
                 scaling_config=ScalingConfig(num_workers=workers, resources_per_worker={"CPU": 1}),
                 datasets={"train": ds}, dataset_config=DataConfig(datasets_to_split=["train"]),
                 run_config=RunConfig(storage_path=storage)).fit()
    with open(out) as f:
        reports = json.load(f)
    steady = reports[1:] or reports
    return {k: statistics.median(r[k] for r in steady) for k in ("rows_per_s", "mb_per_s", "kb_per_row")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--epochs", type=int, default=3, help="the first fills the local cache; the rest are measured")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--workdir", default="work/bench")
    ap.add_argument("--no-s3", action="store_true")
    args = ap.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    import ray

    from raydecode.app import devstack
    from raydecode.data.store import open_store
    from raydecode.runtime import local_system_config, require_token_auth
    from raydecode.storage import S3Options

    os.makedirs(args.workdir, exist_ok=True)
    fl = flops(args.workdir)
    local = make_store(args.workdir)
    rows: list[tuple[str, str, dict]] = []
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        stack = None
        sources = [("local", local, None)]
        if not args.no_s3:
            stack = devstack.up(os.path.join(tmp, "stack"))
            os.environ.update({k: v for k, v in devstack.CREDENTIALS.items()})
            s3 = S3Options(endpoint_url=stack.s3_endpoint)
            t0 = time.time()
            sources.append(("s3", to_s3(local, stack.s3_endpoint, stack.bucket), s3))
            print(f"[bench] copied the store to {sources[-1][1]} in {time.time() - t0:.0f} s", flush=True)
        try:
            require_token_auth()
            ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, logging_level="error",
                     _system_config=local_system_config())
            for name, uri, s3 in sources:
                for variant in VARIANTS:
                    t0 = time.time()
                    res = stream(uri, s3, variant, args.workers, args.epochs, args.batch,
                                 os.path.abspath(os.path.join(tmp, "runs")))
                    rows.append((name, variant, res))
                    print(f"[bench] {name} {variant}: {res['rows_per_s']:.0f} samples/s, {res['mb_per_s']:.0f} MB/s "
                          f"per worker ({args.epochs} epochs in {time.time() - t0:.0f} s)", flush=True)
            ray.shutdown()
        finally:
            if stack is not None:
                devstack.down(os.path.join(tmp, "stack"))

    train = 3 * fl["forward"]  # forward + backward ~ 3 forwards
    with_cnx = train + fl["convnext"]  # the augmented view's ConvNeXt-XL forward, every step
    on_the_fly = with_cnx + fl["bigg"]  # and the bigG tokens, computed on the GPU
    rate = lambda f: PEAK_TFLOPS * 1e12 * MFU / f  # noqa: E731
    print(f"\nFLOPs per sample (torch.utils.flop_counter): MindEye2 paper model ({fl['params'] / 1e9:.2f} B parameters) "
          f"forward {fl['forward'] / 1e9:.0f} G, training ~3x = {train / 1e9:.0f} G; ConvNeXt-XL augmented view "
          f"+{fl['convnext'] / 1e9:.0f} G; ViT-bigG/14 tokens on the fly +{fl['bigg'] / 1e9:.0f} G")
    print(f"one GPU at {MFU:.0%} of {PEAK_TFLOPS:g} TFLOP/s consumes {rate(with_cnx):.0f} samples/s with the tokens "
          f"precomputed, {rate(on_the_fly):.0f} samples/s computing them ({PEAK_TFLOPS:g}e12 x {MFU} / FLOPs)")
    print(f"\n{'source':6s} {'variant':13s} {'samples/s':>10s} {'MB/s':>7s} {'KB/sample':>10s} {'needed/s':>9s} "
          f"{'headroom':>9s}")
    for name, variant, res in rows:
        need = rate(on_the_fly if "images" in variant else with_cnx)
        print(f"{name:6s} {variant:13s} {res['rows_per_s']:10.0f} {res['mb_per_s']:7.0f} {res['kb_per_row']:10.1f} "
              f"{need:9.0f} {res['rows_per_s'] / need:9.2f}")
    m = open_store(local).manifest
    stim, trials = m.shards_of("stimuli"), m.shards_of("trials")
    per_trial = sum(s.rows for s in stim) / statistics.mean(s.rows for s in trials)
    print(f"\nan uncached join decodes each stimulus shard a block of trials falls in, once per block: here a block "
          f"(one trial shard, ~{statistics.mean(s.rows for s in trials):.0f} trials) falls in the store's {len(stim)} "
          f"shards of {stim[0].rows} images ({per_trial:.1f} images decoded a trial); NSD's (a session's 750 trials in 146 shards of "
          f"500: {NSD_DECODES_PER_TRIAL:.0f} a trial) decode ~{NSD_DECODES_PER_TRIAL / per_trial:.0f}x more per "
          "trial, so the uncached rates above are upper bounds at NSD's scale; the cached ones decode each image once "
          "per node")
    best = {(n, v): r["rows_per_s"] / rate(on_the_fly if "images" in v else with_cnx) for n, v, r in rows}
    print("RESULT bench_datapath " + " ".join(f"{n}.{v}={h:.2f}" for (n, v), h in best.items()))


if __name__ == "__main__":
    main()
