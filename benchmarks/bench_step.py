"""Framework tax at the step level: one training step of a method, bare PyTorch vs inside DeepSpeed's engine.

    .venv/bin/python benchmarks/bench_step.py [--method mindeye2] [--preset demo] [--batch 32] [--repeats 5]
        [--world 2] [--threads 1] [--profile]

Same model (same seed), same batch (the memory planner's batch of the method's shapes, targets included), same
AdamW and gradient clipping, one process. Variants, measured in interleaved blocks (median and min/max of the
blocks' per-step times):

- ``bare``: ``loss.backward()``, ``clip_grad_norm_``, ``optimizer.step()``, ``zero_grad`` (``--world N``: the
  model in torch's DistributedDataParallel, N plain processes over gloo, no Ray);
- ``deepspeed``: the train loop's own engine (``raydecode.train.loop.deepspeed_config``, ZeRO-0 on one process,
  gloo), ``engine.backward`` / ``engine.step``;
- ``deepspeed+loop``: the engine plus the finite-loss check the train loop adds per step (the loss parts are
  floats in every variant: ``spec.loss`` returns them so).

Prints the ratios to ``bare``. ``--profile`` adds torch.profiler's per-operator differences, DeepSpeed vs bare
(rank 0's). With ``--world 2`` this separates DeepSpeed's own cost at two ranks from what Ray adds around the same
step (``bench_framework.py --world 2``).
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import time

import torch


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    args = parse_args()
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())})
    if args.world == 1:
        run(0, args)
    else:
        import torch.multiprocessing as mp

        mp.spawn(run, args=(args,), nprocs=args.world)


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--method", default="mindeye2")
    ap.add_argument("--preset", default="demo", choices=["tiny", "demo"])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=10, help="steps per block")
    ap.add_argument("--repeats", type=int, default=5, help="blocks per variant, interleaved")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: every core)")
    ap.add_argument("--world", type=int, default=1, help="processes (gloo); bare = DistributedDataParallel")
    ap.add_argument("--profile", action="store_true")
    return ap.parse_args()


def run(rank: int, args: argparse.Namespace) -> None:
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(args.world)})
    import deepspeed

    from raydecode.config import TrainConfig
    from raydecode.methods.spec import Progress, get_method
    from raydecode.modelinfo.info import dataset_info
    from raydecode.modelinfo.memory import fake_batch
    from raydecode.train.loop import deepspeed_config, skip_lone_allreduce

    torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 1) // args.world))
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    spec = get_method(args.method)
    mcfg = spec.config(args.preset)
    info = dataset_info(args.preset, None)
    torch.manual_seed(0)
    batch = fake_batch(spec, mcfg, info, args.batch)
    cfg = TrainConfig.model_validate({"store": "unused", "method": args.method, "preset": args.preset,
                                      "optim": {"batch_size": args.batch}, "deepspeed": {"zero_stage": 0}})

    def build():
        torch.manual_seed(0)
        model = spec.build_model(mcfg, info)
        opt = torch.optim.AdamW(spec.param_groups(model, mcfg, cfg.optim.weight_decay), lr=cfg.optim.lr)
        return model, opt

    model, opt = build()
    bare_params = [p for p in model.parameters() if p.requires_grad]
    if args.world > 1:
        model = torch.nn.parallel.DistributedDataParallel(model)
    ds_model, ds_opt = build()
    engine, _, _, _ = deepspeed.initialize(model=ds_model, optimizer=ds_opt, config=deepspeed_config(cfg, False),
                                           dist_init_required=False)
    skip_lone_allreduce(engine, args.world, 0)  # as the train loop
    progress = Progress(0, 1, 0, 1000)

    def bare_step():
        loss, _ = spec.loss(model, batch, progress)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(bare_params, cfg.optim.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)

    def ds_step():
        loss, _ = spec.loss(engine, batch, progress)
        engine.backward(loss)
        engine.step()

    def ds_loop_step():
        loss, _ = spec.loss(engine, batch, progress)
        if not torch.isfinite(loss.detach()).all():
            raise RuntimeError("diverged")
        engine.backward(loss)
        engine.step()

    variants = {"bare": bare_step, "deepspeed": ds_step, "deepspeed+loop": ds_loop_step}
    for fn in variants.values():  # warm-up: allocator, autograd graphs, optimizer states
        for _ in range(3):
            fn()
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(args.repeats):
        for name, fn in variants.items():
            t0 = time.perf_counter()
            for _ in range(args.steps):
                fn()
            times[name].append((time.perf_counter() - t0) / args.steps)
    if rank:
        if args.profile:
            profile_ops(bare_step, ds_step, rank)
        return

    base = statistics.median(times["bare"])
    n_params = sum(p.numel() for p in model.parameters())
    print(f"\nstep time, {args.method} ({args.preset}, {n_params / 1e6:.2f} M parameters), batch {args.batch}, "
          f"{args.world} process(es) of {torch.get_num_threads()} threads, {args.repeats} interleaved blocks of "
          f"{args.steps} steps" + (" (bare: DistributedDataParallel)" if args.world > 1 else ""))
    print(f"{'variant':16s} {'median ms':>10s} {'min':>8s} {'max':>8s} {'ratio':>7s}")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:16s} {1e3 * med:10.1f} {1e3 * min(ts):8.1f} {1e3 * max(ts):8.1f} {med / base:7.3f}")
    print("RESULT bench_step " + " ".join(f"{name.replace('+', '_')}={statistics.median(ts) / base:.3f}"
                                          for name, ts in times.items() if name != "bare"))
    if args.profile:
        profile_ops(bare_step, ds_step, rank)


def profile_ops(bare_step, ds_step, rank: int) -> None:
    """torch.profiler's operators per step, DeepSpeed vs bare; every rank profiles (they step together), rank 0
    prints."""
    from torch.profiler import ProfilerActivity, profile

    counts = {}
    for name, fn in (("bare", bare_step), ("deepspeed", ds_step)):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(3):
                fn()
        counts[name] = {e.key: (e.count / 3, e.self_cpu_time_total / 3e3) for e in prof.key_averages()}
    if rank == 0:
        print("operators per step, DeepSpeed vs bare (largest differences in self CPU time first)")
        print(f"{'operator':40s} {'bare n':>8s} {'ds n':>8s} {'bare ms':>8s} {'ds ms':>8s}")
        keys = sorted(set(counts["bare"]) | set(counts["deepspeed"]),
                      key=lambda k: -abs(counts["deepspeed"].get(k, (0, 0))[1] - counts["bare"].get(k, (0, 0))[1]))
        for k in keys[:25]:
            b, d = counts["bare"].get(k, (0, 0)), counts["deepspeed"].get(k, (0, 0))
            print(f"{k[:40]:40s} {b[0]:8.0f} {d[0]:8.0f} {b[1]:8.2f} {d[1]:8.2f}")


if __name__ == "__main__":
    main()
