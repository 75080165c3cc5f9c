"""Torch parts for decoding from the 3D fMRI volume (MindLink, "Subject-agnostic Cross-Subject Brain Decoding"):
one patch frame shared by every subject (:class:`VolumeLayout`), fixed 3D positional encodings
(:func:`positional_encoding_3d`), the subject adversary (Eq. 2, :class:`SubjectAdversary`: gradient reversal or
domain confusion), a Perceiver resampler to a fixed number of tokens (:class:`PerceiverResampler`) and the
token-level alignment loss (Eq. 4-5, :func:`local_infonce`). Pure torch: no subject-specific parameters anywhere.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# -- the shared patch frame ---------------------------------------------------------------------------------------


def _frame_dict(coords: Mapping[int, Any], patch_size: int, box: tuple[int, int, int] | None = None) -> dict:
    """The JSON-safe description of the shared frame (see :class:`VolumeLayout`) built from voxel coordinates."""
    if isinstance(patch_size, bool) or not isinstance(patch_size, int) or patch_size < 1:
        raise ValueError(f"patch_size must be a positive integer, got {patch_size!r}")
    if not coords:
        raise ValueError("VolumeLayout needs the voxel coordinates of at least one subject")
    box = _check_box(box)
    shifted, origin = {}, {}
    for s in sorted(int(k) for k in coords):
        c = _as_coords(coords[s] if s in coords else coords[str(s)], s)
        origin[s] = c.min(0)
        shifted[s] = _place(c, box, s)
    extent = np.max([c.max(0) + 1 for c in shifted.values()], axis=0)
    grid = -(-extent // patch_size)  # patches per axis: the largest extent rounded up to whole patches
    patch_of = {s: _patch_linear(c, grid, patch_size) for s, c in shifted.items()}
    patch_ids = np.unique(np.concatenate(list(patch_of.values())))  # patches holding a voxel of ANY subject
    subjects = {}
    for s, c in shifted.items():
        index = np.searchsorted(patch_ids, patch_of[s]) * patch_size**3 + _offset_in_patch(c, patch_size)
        subjects[str(s)] = {"origin": origin[s].tolist(), "index": index.tolist()}
    return {"patch_size": patch_size, "grid": grid.tolist(), "patch_ids": patch_ids.tolist(), "subjects": subjects,
            "box": None if box is None else list(box)}


def _check_box(box: Any) -> tuple[int, int, int] | None:
    if box is None:
        return None
    if len(box) != 3 or any(isinstance(b, bool) or int(b) != b or b < 1 for b in box):
        raise ValueError(f"box must be three positive voxel counts (i, j, k), got {box!r}")
    return tuple(int(b) for b in box)


def block_coords(n_voxels: int) -> np.ndarray:
    """A compact cube of ``n_voxels`` positions: the volume layout of a subject whose grid is unknown (sizing a
    model with ``raydecode model-info``: parameter counts do not depend on it)."""
    side = math.ceil(n_voxels ** (1 / 3))
    grid = np.stack(np.meshgrid(*[np.arange(side)] * 3, indexing="ij"), -1).reshape(-1, 3)
    return grid[:n_voxels]


def box_of(coords: Mapping[int, Any]) -> tuple[int, int, int]:
    """The largest ROI bounding box (voxels per axis) over subjects: a box frame every subject fits unshrunk."""
    return tuple(int(x) for x in np.max([np.ptp(np.asarray(c), axis=0) + 1 for c in coords.values()], axis=0))


def _place(c: np.ndarray, box: tuple[int, int, int] | None, subject: int) -> np.ndarray:
    """A subject's voxels in the shared frame: its ROI bounding-box corner at (0, 0, 0) and, with ``box``, the
    bounding box stretched per axis onto ``box`` voxels (nearest voxel; no registration)."""
    c = c - c.min(0)
    if box is None:
        return c
    span = c.max(0)
    placed = np.rint(c * ((np.array(box) - 1) / np.maximum(span, 1))).astype(np.int64)
    if len(np.unique(placed, axis=0)) != len(placed):
        raise ValueError(f"subject {subject}: its ROI bounding box {tuple(int(x) for x in span + 1)} voxels does not "
                         f"fit the frame's box {box} (voxels would merge): give a box at least that large")
    return placed


def _as_coords(c: Any, subject: int) -> np.ndarray:
    c = np.asarray(c.cpu() if isinstance(c, torch.Tensor) else c)
    if c.ndim != 2 or c.shape[1] != 3 or len(c) == 0 or c.dtype.kind not in "iu":
        raise ValueError(f"subject {subject}: voxel coordinates must be a non-empty integer (n_voxels, 3) array of "
                         f"i, j, k grid indices, got {c.dtype} {tuple(c.shape)}")
    c = c.astype(np.int64)
    if len(np.unique(c, axis=0)) != len(c):
        raise ValueError(f"subject {subject}: {len(c) - len(np.unique(c, axis=0))} duplicate voxel coordinates")
    return c


def _patch_linear(c: np.ndarray, grid: np.ndarray, p: int) -> np.ndarray:
    """(n,) linear index (C order over the patch grid) of the patch holding each shifted voxel."""
    q = c // p
    return (q[:, 0] * grid[1] + q[:, 1]) * grid[2] + q[:, 2]


def _offset_in_patch(c: np.ndarray, p: int) -> np.ndarray:
    """(n,) position (C order over i, j, k) of each shifted voxel inside its p x p x p patch."""
    r = c % p
    return (r[:, 0] * p + r[:, 1]) * p + r[:, 2]


class VolumeLayout(nn.Module):
    """One patch frame for all subjects: betas (B, W) <-> cubic patches (B, P, p**3), subjects mixed in a batch.

    Subjects' native functional grids differ (shape and placement of the ROI), and MindLink has no
    subject-specific parameters, so every subject is put in the same frame: each subject's coordinates are
    shifted so that its ROI bounding-box minimum is at (0, 0, 0) and, given a ``box``, stretched per axis so that
    its bounding box spans ``box`` voxels (an affine alignment of the ROI boxes, nearest voxel; no registration;
    without a box only the corners align). The volume shape is the largest per-axis extent over subjects rounded up to a multiple of
    ``patch_size``; it is cut into ``grid`` patches per axis, and the kept patches (``patch_ids``, sorted linear
    indices in C order over the patch grid) are those holding at least one ROI voxel of ANY subject: the same
    P tokens for every subject.

    Each subject has a precomputed flat scatter index: voxel v -> ``kept_position * p**3 + offset_in_patch``.
    The indices are non-persistent buffers (they move with ``.to(device)``, are not in the state dict and are no
    parameters); :meth:`to_dict` / :meth:`from_dict` (JSON-safe lists of ints) rebuild the layout from a config.
    """

    def __init__(self, coords: Mapping[int, Any], patch_size: int = 10, box: tuple[int, int, int] | None = None):
        """``coords``: subject -> (n_voxels, 3) int i, j, k indices in that subject's grid (store ``voxels/``);
        ``box``: stretch each subject's ROI bounding box onto this many voxels per axis (None: corners only)."""
        super().__init__()
        self._load(_frame_dict(coords, patch_size, box))

    def _load(self, d: dict) -> None:
        p, grid = int(d["patch_size"]), tuple(int(g) for g in d["grid"])
        patch_ids = torch.tensor([int(i) for i in d["patch_ids"]], dtype=torch.long)
        subjects = sorted(int(s) for s in d["subjects"])
        index = {s: torch.tensor(d["subjects"][str(s)]["index"], dtype=torch.long) for s in subjects}
        self.patch_size, self.grid, self.subjects = p, grid, subjects
        self.box = _check_box(d.get("box"))
        self.n_patches = len(patch_ids)
        self.n_voxels = {s: len(i) for s, i in index.items()}
        self.origin = {s: tuple(int(x) for x in d["subjects"][str(s)]["origin"]) for s in subjects}
        dump = self.n_patches * p**3  # where padding columns go: one slot past the kept patches, dropped
        for s, i in index.items():
            real = i[i != dump]  # == dump: a voxel left out of the patches (with_subject(drop_outside=True))
            if len(i) == 0 or i.min() < 0 or i.max() > dump or len(real.unique()) != len(real):
                raise ValueError(f"subject {s}: scatter index out of range or not unique for {self.n_patches} patches")
        scatter = torch.full((len(subjects), max(self.n_voxels.values())), dump, dtype=torch.long)
        for r, s in enumerate(subjects):
            scatter[r, : len(index[s])] = index[s]
        row = torch.full((max(subjects) + 1,), -1, dtype=torch.long)
        row[torch.tensor(subjects)] = torch.arange(len(subjects))
        self.register_buffer("patch_ids", patch_ids, persistent=False)  # (P,)
        self.register_buffer("scatter_index", scatter, persistent=False)  # (S, W): voxel -> flat patch position
        self.register_buffer("subject_row", row, persistent=False)  # subject number -> row of scatter_index
        self.register_buffer("voxel_counts", torch.tensor([self.n_voxels[s] for s in subjects]), persistent=False)

    # -- the frame ----------------------------------------------------------------------------------------------
    @property
    def width(self) -> int:
        """The widest subject's voxel count: the width of :meth:`from_patches` for a mixed batch."""
        return self.scatter_index.shape[1]

    @property
    def shape(self) -> tuple[int, int, int]:
        """The shared volume's shape in voxels (``grid * patch_size``)."""
        return tuple(g * self.patch_size for g in self.grid)

    def index(self, subject: int) -> torch.Tensor:
        """(n_voxels,) flat position of each of ``subject``'s voxels in the (P * p**3) kept-patch tensor."""
        return self.scatter_index[self._row(subject), : self.n_voxels[subject]]

    def patch_centers(self) -> torch.Tensor:
        """(P, 3) float centres of the kept patches in the shared frame, in voxels (for positional encodings)."""
        g1, g2 = self.grid[1], self.grid[2]
        ids = self.patch_ids
        q = torch.stack([ids // (g1 * g2), (ids // g2) % g1, ids % g2], dim=1)
        return (q.float() + 0.5) * self.patch_size

    # -- betas <-> patches --------------------------------------------------------------------------------------
    def to_patches(self, betas: torch.Tensor, subjects: int | torch.Tensor) -> torch.Tensor:
        """(B, W) betas -> (B, P, p**3) patches, zeros where no voxel is.

        ``subjects``: one subject for the whole batch, or (B,) subject numbers (rows may mix subjects). Row b's
        first ``n_voxels[subjects[b]]`` columns are its voxels; further columns (zero-padding) are ignored.
        """
        idx = self._batch_index(subjects, betas.shape[0])
        n = self._needed_width(subjects, idx)
        if betas.ndim != 2 or betas.shape[1] < n:
            raise ValueError(f"betas must be (batch, >= {n} voxels), got {tuple(betas.shape)}")
        w = idx.shape[1]
        x = betas[:, :w] if betas.shape[1] >= w else F.pad(betas, (0, w - betas.shape[1]))
        p3 = self.patch_size**3
        out = betas.new_zeros(betas.shape[0], self.n_patches * p3 + 1).scatter(1, idx, x)
        return out[:, :-1].reshape(betas.shape[0], self.n_patches, p3)

    def from_patches(self, patches: torch.Tensor, subjects: int | torch.Tensor) -> torch.Tensor:
        """(B, P, p**3) patches -> betas: (B, n_voxels) for one subject, (B, width) zero-padded for a mixed batch."""
        b, p3 = patches.shape[0], self.patch_size**3
        if tuple(patches.shape[1:]) != (self.n_patches, p3):
            raise ValueError(f"patches must be (batch, {self.n_patches}, {p3}), got {tuple(patches.shape)}")
        idx = self._batch_index(subjects, b)
        flat = F.pad(patches.reshape(b, -1), (0, 1))  # the padding slot reads 0
        return flat.gather(1, idx)

    def voxel_mask(self, subjects: int | torch.Tensor) -> torch.Tensor:
        """Bool, True where a voxel is: (P, p**3) for one subject, (B, P, p**3) for (B,) subject numbers."""
        if isinstance(subjects, torch.Tensor):
            ones = torch.ones(len(subjects), self.width, device=self.patch_ids.device)
            return self.to_patches(ones, subjects) > 0
        ones = torch.ones(1, self.n_voxels[subjects], device=self.patch_ids.device)
        return self.to_patches(ones, subjects)[0] > 0

    def _row(self, subject: int) -> int:
        if subject not in self.n_voxels:
            raise ValueError(f"subject {subject} is not in this volume layout (subjects {self.subjects})")
        return self.subjects.index(subject)

    def _batch_index(self, subjects: int | torch.Tensor, batch: int) -> torch.Tensor:
        """(B, w) scatter index of each row: w = n_voxels for one subject, width for a tensor of subjects."""
        if not isinstance(subjects, torch.Tensor):
            return self.index(int(subjects)).expand(batch, -1)
        s = subjects.to(self.subject_row.device, torch.long).reshape(-1)
        if len(s) != batch:
            raise ValueError(f"{len(s)} subject ids for a batch of {batch} rows")
        known = (s >= 0) & (s < len(self.subject_row))
        rows = torch.where(known, self.subject_row[s.clamp(0, len(self.subject_row) - 1)], -1)
        if bool((rows < 0).any()):
            unknown = sorted(set(s[rows < 0].tolist()))
            raise ValueError(f"subjects {unknown} are not in this volume layout (subjects {self.subjects})")
        return self.scatter_index[rows]

    def _needed_width(self, subjects: int | torch.Tensor, idx: torch.Tensor) -> int:
        if not isinstance(subjects, torch.Tensor):
            return idx.shape[1]
        rows = self.subject_row[subjects.to(self.subject_row.device, torch.long).reshape(-1)]
        return int(self.voxel_counts[rows].max()) if len(rows) else 0

    # -- config round trip and new subjects ---------------------------------------------------------------------
    def to_dict(self) -> dict:
        """JSON-safe description (lists of ints) that :meth:`from_dict` rebuilds the identical layout from."""
        subjects = {str(s): {"origin": list(self.origin[s]), "index": self.index(s).tolist()} for s in self.subjects}
        return {"patch_size": self.patch_size, "grid": list(self.grid), "patch_ids": self.patch_ids.tolist(),
                "subjects": subjects, "box": None if self.box is None else list(self.box)}

    @classmethod
    def from_dict(cls, d: dict) -> VolumeLayout:
        layout = cls.__new__(cls)
        nn.Module.__init__(layout)
        layout._load(d)
        return layout

    def with_subject(self, subject: int, coords: Any, drop_outside: bool = False) -> VolumeLayout:
        """This frame (same P patches) plus a new subject, e.g. to adapt a pretrained model to an unseen subject.

        The new subject is placed as the others were (bounding-box corner at (0, 0, 0), stretched onto the box
        when the frame has one). Voxels outside the kept patches raise ValueError, or with ``drop_outside`` are
        left out of the patches (they read back as 0).
        """
        if subject in self.n_voxels:
            raise ValueError(f"subject {subject} is already in this volume layout")
        c = _as_coords(coords, subject)
        origin = c.min(0)
        c = _place(c, self.box, subject)
        p, grid = self.patch_size, np.array(self.grid)
        inside = (c < grid * p).all(1)
        linear = _patch_linear(np.minimum(c, grid * p - 1), grid, p)
        ids = self.patch_ids.cpu().numpy()
        pos = np.searchsorted(ids, linear).clip(0, len(ids) - 1)
        kept = inside & (ids[pos] == linear)
        if not kept.all() and not drop_outside:
            raise ValueError(f"subject {subject}: {int((~kept).sum())} of {len(c)} voxels fall outside this layout's "
                             f"{self.n_patches} patches (pass drop_outside=True to leave them out)")
        dump = self.n_patches * p**3
        index = np.where(kept, pos * p**3 + _offset_in_patch(c, p), dump)
        d = self.to_dict()
        d["subjects"][str(subject)] = {"origin": origin.tolist(), "index": index.tolist()}
        return VolumeLayout.from_dict(d)

    def extra_repr(self) -> str:
        return f"patch_size={self.patch_size}, grid={self.grid}, n_patches={self.n_patches}, voxels={self.n_voxels}"



# -- positional encoding ------------------------------------------------------------------------------------------


def positional_encoding_3d(centers: torch.Tensor, dim: int, base: float = 10000.0) -> torch.Tensor:
    """Fixed sinusoidal 3D encoding, (P, 3) float positions -> (P, dim).

    ``dim`` is split into three equal parts, one per axis; each part is the 1D transformer encoding of that
    axis' coordinate: [sin(x * f_0..f_{k-1}), cos(x * f_0..f_{k-1})] with f_m = base**(-m / k), k = dim / 6.
    """
    if isinstance(dim, bool) or not isinstance(dim, int) or dim <= 0 or dim % 6:
        raise ValueError(f"positional_encoding_3d: dim={dim!r} must be a positive multiple of 6 "
                         "(three axes, a sin and a cos half each)")
    if centers.ndim != 2 or centers.shape[1] != 3:
        raise ValueError(f"positional_encoding_3d: centers must be (P, 3), got {tuple(centers.shape)}")
    k = dim // 6
    freqs = base ** (-torch.arange(k, dtype=torch.float64, device=centers.device) / k)
    angles = centers.to(torch.float64)[:, :, None] * freqs  # (P, 3, k)
    enc = torch.cat([angles.sin(), angles.cos()], dim=-1)  # (P, 3, 2k): axis by axis
    return enc.reshape(len(centers), dim).to(centers.dtype if centers.is_floating_point() else torch.float32)


# -- gradient reversal (Ganin et al. 2016; MindLink Eq. 2) --------------------------------------------------------


class GradientReversal(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by ``-scale``."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = float(scale)
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return -ctx.scale * grad, None


class SubjectAdversary(nn.Module):
    """The subject classifier S_c on the pooled embedding and the encoder's side of the game (MindLink Eq. 2).

    The classifier reads the batch-standardised embedding (each feature centred and scaled over the batch, as a
    linear probe fitted afterwards would see it: a subject hidden in a low-variance direction is still found) through
    ``layers`` linear layers. ``mode`` chooses what the encoder learns:

    - ``"reversal"`` (the paper, Ganin et al. 2016): one cross-entropy term behind a gradient reversal of ``scale``;
      the classifier descends it, the encoder ascends it. Ascending can make the classifier confidently wrong
      (swapping subjects) instead of blind, so a fresh probe may still read the subject.
    - ``"confusion"`` (Tzeng et al. 2015): the classifier descends its cross-entropy on the detached embedding; the
      encoder descends ``scale`` x the cross-entropy of the (frozen) classifier's output to the uniform distribution
      over ``present`` classes: blind, not wrong.

    ``forward`` returns ``(term, ce)``: the loss term to add (weighted by λ2) and the classifier's cross-entropy to
    log. All parameters are this module's own, used only in its ``forward`` (ZeRO-3 gathers them there).
    """

    def __init__(self, dim: int, classes: int, layers: int = 2, mode: Literal["reversal", "confusion"] = "confusion",
                 scale: float = 1.0):
        super().__init__()
        if mode not in ("reversal", "confusion"):
            raise ValueError(f"SubjectAdversary: mode {mode!r} is not 'reversal' or 'confusion'")
        self.mode, self.scale, self.layers = mode, float(scale), layers
        for i in range(layers):
            layer = nn.Linear(dim, classes if i == layers - 1 else dim)  # nn.Linear's initialisation
            self.register_parameter(f"weight{i}", layer.weight)
            self.register_parameter(f"bias{i}", layer.bias)

    def logits(self, z: torch.Tensor, frozen: bool = False) -> torch.Tensor:
        x = (z - z.mean(0)) / (z.std(0, unbiased=False) + 1e-5)
        for i in range(self.layers):
            w, b = getattr(self, f"weight{i}"), getattr(self, f"bias{i}")
            x = F.linear(x, w.detach() if frozen else w, b.detach() if frozen else b)
            x = F.gelu(x) if i < self.layers - 1 else x
        return x.float()

    def forward(self, z: torch.Tensor, labels: torch.Tensor, present: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.mode == "reversal":
            ce = F.cross_entropy(self.logits(GradientReversal.apply(z, self.scale)), labels)
            return ce, ce
        ce = F.cross_entropy(self.logits(z.detach()), labels)
        blind = -F.log_softmax(self.logits(z, frozen=True)[:, present], -1).mean()
        return ce + self.scale * blind, ce

    def extra_repr(self) -> str:
        return f"mode={self.mode}, scale={self.scale}, layers={self.layers}"


# -- Perceiver resampler ------------------------------------------------------------------------------------------


class PerceiverAttention(nn.Module):
    """Pre-norm cross-attention of latents (queries) over [inputs; latents] (keys and values)."""

    def __init__(self, dim: int, heads: int, dim_head: int = 64):
        super().__init__()
        self.heads, self.dim_head = heads, dim_head
        self.norm_inputs, self.norm_latents = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, heads * dim_head, bias=False)
        self.to_kv = nn.Linear(dim, 2 * heads * dim_head, bias=False)
        self.to_out = nn.Linear(heads * dim_head, dim, bias=False)

    def forward(self, x: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """x (B, N, dim), latents (B, L, dim) -> (B, L, dim) (the update, without the residual)."""
        b, n_lat = latents.shape[:2]
        x, latents = self.norm_inputs(x), self.norm_latents(latents)
        k, v = self.to_kv(torch.cat([x, latents], dim=1)).chunk(2, dim=-1)

        def split(t: torch.Tensor) -> torch.Tensor:  # (B, T, h * d) -> (B, h, T, d)
            return t.reshape(b, t.shape[1], self.heads, self.dim_head).transpose(1, 2)

        out = F.scaled_dot_product_attention(split(self.to_q(latents)), split(k), split(v))
        return self.to_out(out.transpose(1, 2).reshape(b, n_lat, self.heads * self.dim_head))


class PerceiverResampler(nn.Module):
    """Any number of input tokens -> ``n_latents`` tokens (Flamingo's / IP-Adapter-Plus's resampler).

    Learnable latents (n_latents, dim) cross-attend to the inputs (projected dim_in -> dim) over ``depth``
    layers, each a pre-norm cross-attention (keys/values: inputs and latents together) then a pre-norm
    feed-forward, both residual; a final LayerNorm. The parameter count does not depend on the input length.
    """

    def __init__(self, dim_in: int, dim: int, depth: int, n_latents: int, heads: int, dim_head: int = 64,
                 ff_mult: int = 4, dim_out: int | None = None):
        super().__init__()
        self.proj_in = nn.Linear(dim_in, dim)
        self.latents = nn.Parameter(torch.randn(n_latents, dim) / math.sqrt(dim))
        self.layers = nn.ModuleList()
        for _ in range(depth):
            ff = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim * ff_mult, bias=False), nn.GELU(),
                               nn.Linear(dim * ff_mult, dim, bias=False))
            self.layers.append(nn.ModuleList([PerceiverAttention(dim, heads, dim_head), ff]))
        self.norm_out = nn.LayerNorm(dim)
        self.proj_out = nn.Linear(dim, dim_out) if dim_out is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, dim_in) -> (B, n_latents, dim) (``dim_out`` if given)."""
        x = self.proj_in(x)
        latents = self.latents.expand(x.shape[0], -1, -1)
        for attn, ff in self.layers:
            latents = latents + attn(x, latents)
            latents = latents + ff(latents)
        return self.proj_out(self.norm_out(latents))


# -- token-level alignment (MindLink Eq. 4-5) ---------------------------------------------------------------------


def local_infonce(brain_tokens: torch.Tensor, image_tokens: torch.Tensor, temperature: float = 0.1,
                  negatives: Literal["batch", "tokens"] = "batch") -> torch.Tensor:
    """MindLink's token-level alignment loss L_local: a bidirectional InfoNCE between brain tokens and their
    cross-attended image context. brain_tokens (B, N, D), image_tokens (B, M, D) (M = N in MindLink) -> scalar.

    1. Cross-attention (Eq. 4), parameter-free: for sample i and brain token b_j^i,
       o_j^i = softmax(b_j^i . (z^i)^T / sqrt(D)) z^i, a weighted sum of the same sample's image tokens z^i.
       (The paper's attention has learned Q/K/V maps; apply them to the inputs before calling, if wanted.)
    2. sim(u, v) = cos(u, v) (L2-normalised dot product), divided by ``temperature`` (tau = 0.1 in the paper).
    3. Contrast, the positive pair being (b_j^i, o_j^i):
       - ``negatives="batch"``: against the same token index j of the other samples in the batch,
         CE over k of sim(b_j^i, o_j^k) and CE over k of sim(o_j^i, b_j^k) (CLIP-style, per token index);
         needs B >= 2 (B = 1 gives 0).
       - ``negatives="tokens"``: Eq. 5 as printed: against the other tokens of the same sample,
         CE over k of sim(b_j^i, o_k^i) and CE over k of sim(o_j^i, b_k^i) (needs M = N tokens on both sides).
       Eq. 5's second term is printed with sim(o_k^i, b_j^i) in the denominator, identical to the first term for
       a symmetric sim; it is read here as the reverse direction (o_j^i against all b_k).
    4. The two cross-entropies are averaged over samples, tokens and directions: the 1 / (2 N N_I) of Eq. 5.
       Eq. 6 weights this loss by lambda_4 = 1e-2 (the caller's job).
    """
    bs, ims = tuple(brain_tokens.shape), tuple(image_tokens.shape)
    if len(bs) != 3 or len(ims) != 3 or bs[0] != ims[0] or bs[2] != ims[2]:
        raise ValueError(f"local_infonce: brain tokens (B, N, D) and image tokens (B, M, D) expected, got "
                         f"{bs} and {ims}")
    b_, n, d = brain_tokens.shape
    attn = torch.softmax(brain_tokens @ image_tokens.transpose(1, 2) / math.sqrt(d), dim=-1)  # (B, N, M)
    o = F.normalize(attn @ image_tokens, dim=-1)  # (B, N, D)
    b = F.normalize(brain_tokens, dim=-1)
    if negatives == "batch":
        logits = torch.einsum("ind,knd->nik", b, o) / temperature  # (N, B, B): token j, brain i vs context k
        target = torch.arange(b_, device=b.device).expand(n, b_)
    elif negatives == "tokens":
        if image_tokens.shape[1] != n:
            raise ValueError(f"local_infonce: negatives='tokens' needs as many image as brain tokens, got "
                             f"{image_tokens.shape[1]} and {n}")
        logits = torch.einsum("ijd,ikd->ijk", b, o) / temperature  # (B, N, N): sample i, brain j vs context k
        target = torch.arange(n, device=b.device).expand(b_, n)
    else:
        raise ValueError(f"local_infonce: negatives must be 'batch' or 'tokens', got {negatives!r}")
    k = logits.shape[-1]
    brain_to_image = F.cross_entropy(logits.reshape(-1, k).float(), target.reshape(-1))
    image_to_brain = F.cross_entropy(logits.transpose(1, 2).reshape(-1, k).float(), target.reshape(-1))
    return (brain_to_image + image_to_brain) / 2
