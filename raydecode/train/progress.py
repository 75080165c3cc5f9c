"""Training progress on the driver: a step counter with rate and ETA, fed by rank 0.

Ray Train V2's reports are collective (every rank reaches ``ray.train.report`` together) and its callbacks run
in the controller, so reporting every few steps would add a barrier to the loop. Instead rank 0 posts its
counters, at most once a second and without waiting, to a small actor (0 CPUs) that the driver polls from a
thread while ``trainer.fit()`` blocks. The bar shows ``step/total``, steps/s, the ETA, the epoch and the running
loss; after each evaluation it also shows the test top-1. Without a terminal the bar redraws every 30 s.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import Any

import ray

POST_EVERY_S = 1.0


@ray.remote(num_cpus=0, max_restarts=0)
class ProgressBoard:
    """The latest counters rank 0 posted; a worker group that restarts from a checkpoint posts from there."""

    def __init__(self) -> None:
        self.state: dict[str, Any] = {}

    def post(self, state: dict[str, Any]) -> None:
        self.state.update(state)

    def read(self) -> dict[str, Any]:
        return self.state


class Poster:
    """Rank 0's side: ``step(...)`` after each optimizer step, throttled; ``epoch(...)`` after each epoch."""

    def __init__(self, board, enabled: bool, every_s: float = POST_EVERY_S) -> None:
        self.board = board if enabled else None
        self.every_s = every_s
        self.last = 0.0

    def begin(self, step: int, epoch: int) -> None:
        """Where this worker group starts: 0, or the checkpoint it resumed from."""
        if self.board is not None:
            self.last = time.monotonic()
            self.board.post.remote({"start": step, "step": step, "epoch": epoch})

    def step(self, step: int, epoch: int, loss: float | None) -> None:
        now = time.monotonic()
        if self.board is None or now - self.last < self.every_s:
            return
        self.last = now
        self.board.post.remote({"step": step, "epoch": epoch, "loss": loss})

    def epoch(self, step: int, epoch: int, metrics: dict[str, float]) -> None:
        if self.board is None:
            return
        self.last = time.monotonic()
        shown = {k.split(".")[-1].replace("brain_to_image_top1", "top1"): float(v) for k, v in metrics.items()
                 if k == "retrieval.brain_to_image_top1" or k == "test.diffusion_loss"}
        self.board.post.remote({"step": step, "epoch": epoch, "loss": metrics.get("train.loss"), "test": shown})


class DriverProgress:
    """The driver's bar: a context manager around ``trainer.fit()``; ``board`` goes to the workers."""

    def __init__(self, stage: str, total_steps: int, steps_per_epoch: int, epochs: int,
                 enabled: bool = True, poll_s: float = 1.0, file=None) -> None:
        self.stage, self.total, self.steps_per_epoch, self.epochs = stage, total_steps, steps_per_epoch, epochs
        self.enabled = enabled
        self.poll_s = poll_s
        self.file = file
        self.board = ProgressBoard.remote() if enabled else None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._start: int | None = None  # the step the running worker group began at (its clock starts then)
        self.bar = None

    def __enter__(self) -> DriverProgress:
        if not self.enabled:
            return self
        from tqdm.auto import tqdm

        out = self.file or sys.stderr
        tty = hasattr(out, "isatty") and out.isatty()
        self.bar = tqdm(total=self.total, file=out, desc=f"[{self.stage}] train", unit="step", dynamic_ncols=True,
                        mininterval=0.5 if tty else 30, smoothing=0.1, leave=True)
        self._thread = threading.Thread(target=self._poll, name="raydecode-train-progress", daemon=True)
        self._thread.start()
        return self

    def _poll(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                state = ray.get(self.board.read.remote(), timeout=10)
            except Exception:  # noqa: BLE001 - a missed poll only delays the bar
                continue
            self._draw(state)

    def _draw(self, state: dict[str, Any]) -> None:
        if "step" not in state or self.bar is None:
            return
        start, step = int(state.get("start", 0)), int(state["step"])
        if start != self._start:  # a (re)started worker group: rate and ETA count only steps trained from here
            self._start = start
            self.bar.n = self.bar.last_print_n = start
            self.bar.start_t = self.bar.last_print_t = self.bar._time()
        self.bar.update(step - self.bar.n)
        post = {"epoch": f"{min(int(state.get('epoch', 0)) + 1, self.epochs)}/{self.epochs}"}
        if state.get("loss") is not None:
            post["loss"] = f"{state['loss']:.4g}"
        post.update({k: f"{v:.3g}" for k, v in state.get("test", {}).items()})
        self.bar.set_postfix(post, refresh=False)

    def __exit__(self, *exc) -> None:
        if not self.enabled:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=15)
        try:  # the last counters (the thread may have missed them)
            self._draw(ray.get(self.board.read.remote(), timeout=10))
        except Exception:  # noqa: BLE001
            pass
        self.bar.close()
        ray.kill(self.board)
