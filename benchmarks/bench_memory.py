"""The memory planner against measured memory: one fp32 training step on CPU (plain torch AdamW, no DeepSpeed) of
each method at the demo preset, peak RSS measured in a fresh process, side by side with what
`raydecode model-info --memory` estimates for the same step (fp32 model states of ZeRO-0, 4 Psi + 12 Psi_t, plus
the activations it measures from autograd's saved tensors). Prints both and their ratio (the target: within 20 %).
The step runs with a fixed glibc mmap threshold, so that RSS follows the tensors alive (as a GPU allocator's
statistics would) rather than the heap memory glibc keeps after large frees (18-31 % more without it).

    python benchmarks/bench_memory.py [--batch 512] [--methods mindeye2 duala dynadiff]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

STEP = """
import json, resource, sys, torch
from raydecode.methods.spec import Progress, get_method
from raydecode.modelinfo.info import dataset_info
from raydecode.modelinfo.memory import fake_batch, target_shapes
method, preset, batch = sys.argv[1], sys.argv[2], int(sys.argv[3])
spec = get_method(method)
mcfg, info = spec.config(preset), dataset_info(preset)
shapes = target_shapes(spec, mcfg)
data = fake_batch(spec, mcfg, info, batch, shapes)
torch.manual_seed(0)
warm = spec.build_model(mcfg, info)  # libraries' first-use buffers (not the model) before the baseline
with torch.no_grad():
    spec.loss(warm, fake_batch(spec, mcfg, info, 2, shapes), Progress(0, 1, 0, 1))
del warm
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
model = spec.build_model(mcfg, info)
params = [p for g in spec.param_groups(model, mcfg, 0.0) for p in g["params"]]
opt = torch.optim.AdamW(params, lr=1e-4)
loss, _ = spec.loss(model, data, Progress(0, 1, 0, 1))
loss.backward()
opt.step()
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"measured": (peak - base) * 1024}))
"""


def estimate(method: str, preset: str, batch: int) -> dict:
    from raydecode.methods.spec import get_method
    from raydecode.modelinfo.info import dataset_info
    from raydecode.modelinfo.memory import build_for_measurement, measure_activations, model_states_bytes

    spec = get_method(method)
    mcfg, info = spec.config(preset), dataset_info(preset)
    model, trainable = build_for_measurement(spec, mcfg, info)
    total, n_train = sum(p.numel() for p in model.parameters()), sum(p.numel() for p in trainable)
    act = measure_activations(spec, mcfg, info, model)
    states = model_states_bytes(total, n_train, 0, 1, "fp32")
    return {"states": states, "activations": act.at(batch, "fp32"), "estimate": states + act.at(batch, "fp32")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--preset", default="demo")
    ap.add_argument("--methods", nargs="+", default=["mindeye2", "duala", "dynadiff"])
    args = ap.parse_args()
    rows = []
    for method in args.methods:
        est = estimate(method, args.preset, args.batch)
        # glibc's malloc keeps freed heap memory (its mmap threshold grows after large frees): a fixed threshold
        # makes RSS follow the tensors alive, as a GPU's caching allocator reports them, not the heap's history
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}
        proc = subprocess.run([sys.executable, "-c", STEP, method, args.preset, str(args.batch)],
                              capture_output=True, text=True, timeout=1800, env=env)
        if proc.returncode != 0:
            raise SystemExit(f"{method}: {proc.stderr[-2000:]}")
        measured = json.loads(proc.stdout.strip().splitlines()[-1])["measured"]
        rows.append((method, est["states"] / 1e6, est["activations"] / 1e6, est["estimate"] / 1e6, measured / 1e6,
                     measured / est["estimate"]))
    print(f"one fp32 training step on CPU, preset {args.preset}, batch {args.batch}: peak RSS over the baseline vs "
          "the planner's estimate")
    print(f"{'method':10} {'states MB':>10} {'activations MB':>15} {'estimate MB':>12} {'measured MB':>12} "
          f"{'measured/estimate':>18}")
    for m, s, a, e, meas, r in rows:
        print(f"{m:10} {s:10.1f} {a:15.1f} {e:12.1f} {meas:12.1f} {r:18.2f}")
    print("RESULT bench_memory " + " ".join(f"{row[0]}={row[5]:.2f}" for row in rows))


if __name__ == "__main__":
    main()
