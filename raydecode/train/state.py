"""What a training checkpoint holds beside DeepSpeed's files, and how DeepSpeed's files are read back.

- Each rank's random state (:func:`save_rng` / :func:`restore_rng`): with the data order a function of the seeds
  and the epoch, a run resumed from a mid-epoch checkpoint ends with the weights an uninterrupted run ends with.
- :class:`WeightsOnlyLoads`: DeepSpeed reads its checkpoints with ``torch.load(weights_only=False)``,
  which runs whatever code a pickle names; checkpoints live in storage other jobs can write, so they are read with
  ``weights_only=True`` and DeepSpeed's three state classes allowed, nothing else.
"""

from __future__ import annotations

import os
import pickle
import random
import re

import numpy as np
import torch

from raydecode.errors import StoreError, first_line


def deepspeed_state_classes() -> list[type]:
    """The non-tensor objects in DeepSpeed's model and optimizer states (ZeRO 0-3, fp32: read back from every
    checkpoint the test suite writes). DeepSpeed is imported here, in the workers, not by the driver."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


def _rng_file(directory: str, rank: int) -> str:
    return os.path.join(directory, f"rng_rank{rank:04d}.pt")


def save_rng(directory: str, rank: int) -> None:
    """This rank's random state (torch CPU and CUDA, numpy's global, Python's), beside DeepSpeed's files: with the
    data order a function of the seeds and the epoch, a resumed run draws the same dropout masks and noise as an
    uninterrupted one."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos,
                                                       has_gauss, gauss],
             "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    torch.save(state, _rng_file(directory, rank))


def restore_rng(directory: str, rank: int) -> bool:
    """:func:`save_rng`'s state for ``rank``, if the checkpoint has it (one written with another world size or
    before random states were saved does not)."""
    path = _rng_file(directory, rank)
    if not os.path.exists(path):
        return False
    state = torch.load(path, weights_only=True)  # tensors, ints and tuples only: no code runs on load
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    return True


class WeightsOnlyLoads:
    """A DeepSpeed checkpoint engine whose loads run no code (see the module's docstring): saves, commits and the
    rest go to the engine it wraps; a file that names any class but DeepSpeed's own is refused, naming the file."""

    def __init__(self, engine):
        self._engine = engine

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def load(self, path: str, map_location=None):
        try:
            with torch.serialization.safe_globals(deepspeed_state_classes()):
                return torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as exc:
            named = re.search(r"GLOBAL ([\w.]+)", str(exc))
            raise StoreError(f"{path}: refused: the checkpoint file names code to run when loaded "
                             f"({named.group(1) if named else first_line(exc)}); this training run did not "
                             "write it") from None
        except (RuntimeError, EOFError, OSError) as exc:  # torch's zip reader on a truncated or garbled file
            raise StoreError(f"{path}: unreadable checkpoint file ({first_line(exc, 160)}); "
                             "delete this checkpoint directory to resume from the one before") from None
