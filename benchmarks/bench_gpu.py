"""One GPU, a training job's own step: time, samples/s, peak memory and MFU of the paper presets (MindEye2, Dynadiff).

    .venv/bin/python benchmarks/bench_gpu.py [--config jobs/pretrain-nsd.yaml jobs/dynadiff-nsd.yaml]
        [--steps 200] [--warmup 20] [--batch N] [--device auto|cuda|cpu] [--preset P] [--peak-tflops T] [--plan]

For each job YAML: its method, preset, model overrides, per-GPU batch, ZeRO stage and precision (``bf16`` on a GPU),
the model built with random weights on the device (pretrained weights change values, not time: the YAML's weight
paths are dropped, as ``model-info --memory`` does) and wrapped in the train loop's own DeepSpeed engine
(``raydecode.train.loop.deepspeed_config``, one rank). Each step is what a worker of the job runs after its batch
arrives: the targets that are drawn fresh every step (MindEye2's ConvNeXt view of a blur-augmented image, on the
device; stored targets are inputs, as in the NSD jobs with ``data.local_cache``), ``spec.loss``, ``engine.backward``,
``engine.step``. The batch is the memory planner's (``fake_batch``: the method's columns and targets, subjects in
turn), on the device.

Printed per job: median step time over ``--steps`` (after ``--warmup``; CUDA-synchronised), samples/s, peak memory
(``torch.cuda.max_memory_allocated``; peak RSS on CPU), FLOPs per sample (``torch.utils.flop_counter`` over one
step's forward and backward and the augmented targets' forward) and MFU = FLOPs per step / step time / peak
(``--peak-tflops``, else the device's dense bf16 peak: H100 / H200 SXM 989, A100 312; none on CPU). ``--plan`` adds
``model-info --memory``'s estimate of the peak at that batch (one GPU) beside the measured one.

``make bench`` runs it with its defaults: without a CUDA device it prints ``skipped``. ``--device cpu --preset tiny
--steps 5 --warmup 2`` runs the same code on CPU in fp32 (a check of the script, not a number to report).
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import time

import torch
from bench_step import _free_port  # a sibling script: benchmarks/ is the path's first entry

PEAKS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}  # dense bf16
JOBS = ("jobs/pretrain-nsd.yaml", "jobs/dynadiff-nsd.yaml")


def peak_tflops(device: torch.device, given: float | None) -> float | None:
    if given:
        return given
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAKS.items() if k in name), None)


def job(path: str, args: argparse.Namespace) -> dict:
    """``path``'s method, preset, overrides, per-GPU batch and ZeRO stage (``--preset`` / ``--batch`` override)."""
    from raydecode.modelinfo.memory import job_settings

    settings = job_settings(path)
    if args.preset:  # a paper job's model overrides (weights' architectures, image sizes) are the paper's
        settings.update(preset=args.preset, overrides={})
    return {**settings, "batch": args.batch or settings["batch"] or 32, "path": path}


def target_encoders(spec, mcfg, device: torch.device) -> dict:
    """The targets drawn fresh every step (``augments``), on ``device``: random weights (architecture only, values
    drawn N(0, 0.02)) where the real ones are pretrained-only."""
    from raydecode.nn.encoders import FrozenEncoder, augments, encoder_config, requires_weights

    out = {}
    for key, name in spec.targets(mcfg).items():
        cfg = encoder_config(name)
        if not augments(cfg):
            continue
        if requires_weights(cfg) or cfg.weights is not None:
            enc = FrozenEncoder(cfg, architecture_only=True)
            enc.net = enc.net.to_empty(device=device)
            with torch.no_grad():
                for p in enc.net.parameters():
                    p.normal_(0.0, 0.02)
        else:
            enc = FrozenEncoder(cfg).to(device)
        out[key] = enc
    return out


def run_job(settings: dict, args: argparse.Namespace, device: torch.device) -> dict:
    import deepspeed
    from torch.utils.flop_counter import FlopCounterMode

    from raydecode.config import TrainConfig
    from raydecode.methods.spec import Progress, get_method
    from raydecode.modelinfo.info import dataset_info
    from raydecode.modelinfo.memory import fake_batch
    from raydecode.train.loop import deepspeed_config, skip_lone_allreduce

    spec = get_method(settings["method"])
    mcfg = spec.config(settings["preset"], settings["overrides"])
    info = dataset_info(settings["preset"], None)
    b = settings["batch"]
    bf16 = device.type == "cuda"
    cfg = TrainConfig.model_validate({"store": "unused", "method": settings["method"], "preset": settings["preset"],
                                      "optim": {"batch_size": b}, "deepspeed": {"zero_stage": settings["zero"]}})
    torch.manual_seed(0)
    t0 = time.perf_counter()
    with torch.device(device):
        model = spec.build_model(mcfg, info)
    opt = torch.optim.AdamW(spec.param_groups(model, mcfg, cfg.optim.weight_decay), lr=cfg.optim.lr)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=deepspeed_config(cfg, bf16),
                                           dist_init_required=False)
    skip_lone_allreduce(engine, 1, settings["zero"])
    dtype = torch.bfloat16 if bf16 else torch.float32
    encoders = target_encoders(spec, mcfg, device)
    batch = {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device))
             for k, v in fake_batch(spec, mcfg, info, b).items()}
    images = {k: torch.randint(0, 256, (b, e.cfg.image_size, e.cfg.image_size, 3), dtype=torch.uint8, device=device)
              for k, e in encoders.items()}
    build_s = time.perf_counter() - t0
    total = args.warmup + args.steps

    def step(i: int) -> torch.Tensor:
        with torch.no_grad():
            for k, enc in encoders.items():
                batch[f"{k}_aug_tokens"] = enc.encode_augmented(images[k]).to(dtype)
        loss, _ = spec.loss(engine, batch, Progress(0, 1, i, total))
        engine.backward(loss)
        engine.step()
        return loss.detach()

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    with FlopCounterMode(display=False) as fc:  # one step, outside the timing (the counter slows it)
        step(0)
    flops = fc.get_total_flops()
    losses, times = [], []
    for i in range(1, args.warmup):
        step(i)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sync()
    for i in range(args.warmup, total):
        t = time.perf_counter()
        losses.append(step(i))
        sync()
        times.append(time.perf_counter() - t)
    peak = (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    med = statistics.median(times)
    out = {"method": settings["method"], "preset": settings["preset"], "batch": b, "zero": settings["zero"],
           "precision": "bf16" if bf16 else "fp32", "params": sum(p.numel() for p in model.parameters()),
           "step_s": med, "min_s": min(times), "max_s": max(times), "samples_s": b / med, "peak_gb": peak / 1e9,
           "flops_sample": flops / b, "tflops": flops / med / 1e12, "build_s": build_s,
           "loss_first": float(losses[0]), "loss_last": float(losses[-1])}
    return out  # the model, engine and batch go with this frame


def planned_peak_gb(settings: dict) -> float:
    """``model-info --memory``'s estimate of one GPU's peak at the job's batch: bf16 model states of ZeRO at one GPU,
    activations at the batch, the frozen encoders."""
    from raydecode.modelinfo.memory import GB, memory_plan

    plan = memory_plan(settings["method"], settings["preset"], overrides=settings["overrides"], gpus=1)
    b = settings["batch"]
    states = plan["zero"][settings["zero"]]["states_gb"]
    act = (plan["activations_fixed_gb_bf16"] + b * plan["activations_per_sample_gb_bf16"]
           + b * b * plan.get("activations_per_pair_gb_bf16", 0.0))
    return (states + act + sum(plan["frozen_encoders_gb"].values())) * GB / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", nargs="+", default=list(JOBS), help="training job YAMLs")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--batch", type=int, default=None, help="per GPU (default: each job's optim.batch_size)")
    ap.add_argument("--preset", default=None, help="instead of each job's (e.g. tiny, to check the script on CPU)")
    ap.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    ap.add_argument("--peak-tflops", type=float, default=None, help="the device's dense bf16 peak (MFU's denominator)")
    ap.add_argument("--plan", action="store_true", help="also model-info --memory's estimate of the peak")
    args = ap.parse_args()
    if args.device == "auto" and not torch.cuda.is_available():
        print("no CUDA device: skipped (--device cpu --preset tiny checks the script on CPU)")
        print("RESULT bench_gpu skipped=no-cuda")
        return
    device = torch.device("cuda:0" if args.device in ("auto", "cuda") else "cpu")
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "RANK": "0", "LOCAL_RANK": "0",
                       "WORLD_SIZE": "1"})
    import deepspeed

    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo", auto_mpi_discovery=False)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    else:
        torch.set_num_threads(os.cpu_count() or 1)
    peak = peak_tflops(device, args.peak_tflops)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    rows = []
    for path in args.config:
        settings = job(path, args)
        res = run_job(settings, args, device)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if args.plan:
            res["plan_gb"] = planned_peak_gb(settings)
        res["mfu"] = res["tflops"] / peak if peak else None
        rows.append(res)
        print(f"[bench] {path}: {res['method']} ({res['preset']}) batch {res['batch']}: {1e3 * res['step_s']:.1f} ms a "
              f"step, {res['samples_s']:.1f} samples/s, peak {res['peak_gb']:.1f} GB, loss {res['loss_first']:.3g} "
              f"-> {res['loss_last']:.3g}", flush=True)

    print(f"\none {name}" + (f" ({peak:g} TFLOP/s dense bf16)" if peak else "") + f", one rank, {args.steps} steps "
          f"after {args.warmup} warm-up, random weights, the job's per-GPU batch")
    print(f"{'job':26s} {'params M':>9s} {'batch':>5s} {'ZeRO':>4s} {'prec':>5s} {'step ms':>8s} {'min':>7s} "
          f"{'max':>7s} {'samples/s':>9s} {'GFLOP/sample':>12s} {'TFLOP/s':>8s} {'MFU':>6s} {'peak GB':>8s}"
          + (f" {'plan GB':>8s}" if args.plan else ""))
    for path, r in zip(args.config, rows):
        print(f"{os.path.basename(path):26s} {r['params'] / 1e6:9.1f} {r['batch']:5d} {r['zero']:4d} "
              f"{r['precision']:>5s} {1e3 * r['step_s']:8.1f} {1e3 * r['min_s']:7.1f} {1e3 * r['max_s']:7.1f} "
              f"{r['samples_s']:9.1f} {r['flops_sample'] / 1e9:12.4g} {r['tflops']:8.4g} "
              + (f"{r['mfu']:6.1%}" if r["mfu"] is not None else f"{'-':>6s}") + f" {r['peak_gb']:8.1f}"
              + (f" {r['plan_gb']:8.1f}" if args.plan else ""))
    print("MFU = FLOPs per step (torch.utils.flop_counter: forward + backward + fresh targets) / step time / peak")
    print("RESULT bench_gpu " + " ".join(
        f"{r['method']}_{k}={v:.3f}" for r in rows for k, v in
        (("mfu", r["mfu"]), ("samples_s", r["samples_s"]), ("peak_gb", r["peak_gb"])) if v is not None))


if __name__ == "__main__":
    main()
