"""Synthetic NSD with planted structure.

The store has NSD's shape (8 subjects with different voxel counts in a 3D
functional grid, sessions of trials, each image shown 3 times, subject-unique
training images plus a shared test set, 80 COCO categories, captions, per-run
BOLD time series at TR 1.3 s) and a known generative model:

    image latent  z = [z_sem, z_low]      z_sem: mean of the image's category prototypes + noise
    image         x = render(z)           procedural RGB (background, one shape per category) + nuisance texture
    shared code   f = tanh(W2 gelu(W1 z)) one nonlinear function of z, the same for every subject
    betas         b_s = g_s * (M_s f) + trial noise + estimation noise
                  M_s: subject-specific, spatially smooth loadings over the subject's voxel grid

so decoding works (betas carry f, f carries the image), and every subject
sees the world through the same f: a decoder that learnt f from 7 subjects
needs less data from the 8th. Everything is deterministic for a seed: each
shard draws from its own ``SeedSequence`` stream, so any shard can be
(re)built alone, which is what lets an interrupted ingest resume.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field
from scipy.ndimage import gaussian_filter, map_coordinates
from scipy.stats import gamma

from raydecode.data.schema import (
    COCO_CATEGORIES,
    N_CATEGORIES,
    SubjectInfo,
    repetitions,
    stimuli_schema,
    timeseries_schema,
    trials_schema,
    voxels_schema,
)

TRIAL_S = 4.0  # NSD: 3 s image + 1 s blank
STIM_S = 3.0
LEAD_IN_S = 4.0
TAIL_S = 16.0
SHAPES = ("disc", "square", "ring", "stripes", "diamond")


class SyntheticPreset(BaseModel):
    """Sizes of a synthetic NSD. ``sessions[s] * trials_per_session`` trials for subject s."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    voxels: tuple[int, ...]  # per subject; NSD nsdgeneral: 12.7k-17.9k
    sessions: tuple[int, ...]  # per subject; NSD: 40, 40, 32, 30, 40, 32, 40, 30
    grid_shape: tuple[int, int, int]  # functional grid (NSD 1.8 mm: 81 x 104 x 83)
    n_shared: int  # test images seen by every subject (NSD: 1000)
    n_unique: int  # training images per subject (NSD: 9000)
    repetitions: int = 3
    trials_per_session: int  # NSD: 750
    runs_per_session: int  # NSD: 12
    image_size: int  # NSD: 425
    latent_sem: int
    latent_low: int
    feature_dim: int  # size of the semantic part of the shared code f
    low_grid: int = 4  # low-level part of f: the clean image's mean colour on a low_grid x low_grid grid
    anatomical_similarity: float = Field(0.7, ge=0, le=1)  # share of each subject map that follows the template
    trial_noise: float = Field(0.8, ge=0)  # neural trial-to-trial variability (in betas and BOLD)
    beta_noise: float = Field(0.6, ge=0)  # GLM estimation noise (betas only)
    bold_noise: float = Field(0.5, ge=0)
    tr_s: float = 1.3
    images_per_shard: int = 1000

    @property
    def n_subjects(self) -> int:
        return len(self.voxels)

    @property
    def n_images(self) -> int:
        return self.n_shared + self.n_subjects * self.n_unique


PRESETS: dict[str, SyntheticPreset] = {
    "tiny": SyntheticPreset(
        name="tiny",
        voxels=(240, 200, 230, 180, 190, 260, 170, 210),
        sessions=(2,) * 8,
        grid_shape=(12, 14, 12),
        n_shared=30,
        n_unique=50,
        trials_per_session=120,
        runs_per_session=2,
        image_size=32,
        low_grid=3,
        latent_sem=8,
        latent_low=6,
        feature_dim=16,
    ),
    "demo": SyntheticPreset(
        name="demo",
        voxels=(900, 820, 880, 760, 740, 960, 700, 830),
        sessions=(4,) * 8,
        grid_shape=(20, 24, 20),
        n_shared=100,
        n_unique=300,
        trials_per_session=300,
        runs_per_session=4,
        image_size=64,
        latent_sem=16,
        latent_low=8,
        feature_dim=32,
    ),
    "paper": SyntheticPreset(
        name="paper",
        voxels=(15724, 14278, 15226, 13153, 13039, 17907, 12682, 14386),
        sessions=(40, 40, 32, 30, 40, 32, 40, 30),
        grid_shape=(81, 104, 83),
        n_shared=1000,
        n_unique=9000,
        trials_per_session=750,
        runs_per_session=12,
        image_size=425,
        low_grid=6,
        latent_sem=32,
        latent_low=16,
        feature_dim=64,
        images_per_shard=2000,
    ),
}


def _gelu(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + np.tanh(0.7978845608 * (x + 0.044715 * x**3)))


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _hrf_integral(dt: float = 0.05, length_s: float = 32.0):
    """Cumulative integral of SPM's canonical double-gamma HRF, as a function of time."""
    t = np.arange(0.0, length_s, dt)
    h = gamma.pdf(t, 6.0) - gamma.pdf(t, 16.0) / 6.0
    h /= h.sum() * dt
    cum = np.concatenate([[0.0], np.cumsum(h) * dt])
    tt = np.concatenate([t, [length_s]])

    def integral(x: np.ndarray) -> np.ndarray:
        return np.interp(x, tt, cum, left=0.0, right=cum[-1])

    return integral


@dataclass
class Subject:
    subject: int
    coords: np.ndarray  # (V, 3) int, C order
    roi: np.ndarray  # (V,) str
    loadings: np.ndarray  # (V, feature_dim): gain * smooth map / sqrt(feature_dim)
    noise_scale: float


@dataclass
class Trial:
    session: np.ndarray
    run: np.ndarray
    trial: np.ndarray
    image_id: np.ndarray
    repetition: np.ndarray
    onset_s: np.ndarray


class SyntheticNSD:
    """The generative world of one (preset, seed). Cheap to construct; shards are built on demand."""

    def __init__(self, preset: SyntheticPreset | str, seed: int = 0):
        self.preset = PRESETS[preset] if isinstance(preset, str) else preset
        self.seed = int(seed)
        p = self.preset
        if len(p.sessions) != p.n_subjects:
            raise ValueError("preset: one session count per subject")
        full = (p.n_shared + p.n_unique) * p.repetitions
        if full % p.trials_per_session:
            raise ValueError("preset: (n_shared + n_unique) * repetitions must fill whole sessions")
        if max(p.sessions) > full // p.trials_per_session:
            raise ValueError("preset: more sessions than trials to fill them")

    def rng(self, *key: int) -> np.random.Generator:
        return np.random.default_rng(np.random.SeedSequence(self.seed, spawn_key=key))

    # -- the world: images, categories, the shared code ---------------------------------
    @cached_property
    def world(self) -> dict:
        p = self.preset
        rng = self.rng(0)
        n = p.n_images
        freq = 1.0 / np.arange(1, N_CATEGORIES + 1) ** 0.8  # COCO-like: a few categories dominate
        freq /= freq.sum()
        proto = rng.standard_normal((N_CATEGORIES, p.latent_sem))
        colors = rng.uniform(0.05, 0.95, (N_CATEGORIES, 3))
        shapes = rng.integers(0, len(SHAPES), N_CATEGORIES)
        n_cats = rng.choice([1, 2, 3], size=n, p=[0.5, 0.3, 0.2])
        cats = np.zeros((n, N_CATEGORIES), np.uint8)
        first = np.zeros(n, int)
        cat_lists = []
        for i in range(n):
            c = rng.choice(N_CATEGORIES, size=n_cats[i], replace=False, p=freq)
            cats[i, c] = 1
            first[i] = c[0]
            cat_lists.append(c)
        z_sem = np.stack([proto[c].mean(0) for c in cat_lists]) + 0.35 * rng.standard_normal((n, p.latent_sem))
        z_low = rng.standard_normal((n, p.latent_low))
        z = np.concatenate([z_sem, z_low], 1)
        hidden = 4 * p.feature_dim
        w1 = rng.standard_normal((z.shape[1], hidden)) / math.sqrt(z.shape[1])
        b1 = 0.5 * rng.standard_normal(hidden)
        w2 = rng.standard_normal((hidden, p.feature_dim)) / math.sqrt(hidden)
        f = np.tanh(1.5 * _gelu(z @ w1 + b1) @ w2)
        order = rng.permutation(n)
        shared = np.sort(order[: p.n_shared])
        unique = [np.sort(order[p.n_shared + s * p.n_unique : p.n_shared + (s + 1) * p.n_unique]) for s in range(p.n_subjects)]
        render = {
            "w_bg": rng.standard_normal((p.latent_low, 6)),
            "w_pos": rng.standard_normal((3, p.latent_low, 2)),
            "w_size": rng.standard_normal((3, p.latent_low)) / math.sqrt(p.latent_low),
            "w_col": rng.standard_normal((p.latent_sem, 3)) / math.sqrt(p.latent_sem),
        }
        return dict(
            cats=cats, cat_lists=cat_lists, colors=colors, shapes=shapes, z_sem=z_sem, z_low=z_low,
            latent=z.astype(np.float32), semantic=f.astype(np.float32), shared=shared, unique=unique, render=render,
        )

    @cached_property
    def _features(self) -> np.ndarray:
        g = self.preset.low_grid
        low = np.stack(
            [self.render(i, size=4 * g, nuisance=False).reshape(g, 4, g, 4, 3).mean((1, 3)).ravel()
             for i in range(self.preset.n_images)]
        )
        f = np.concatenate([self.world["semantic"], low], 1)
        return ((f - f.mean(0)) / (f.std(0) + 1e-6)).astype(np.float32)

    @property
    def image_latents(self) -> np.ndarray:
        """(n_images, latent) ground truth: what the images are rendered from."""
        return self.world["latent"]

    @property
    def shared_features(self) -> np.ndarray:
        """(n_images, feature_dim + 3 * low_grid**2): the shared code every subject's betas mix:
        a semantic part (nonlinear in the latent) and a low-level part (coarse colour layout)."""
        return self._features

    @property
    def n_semantic(self) -> int:
        return self.preset.feature_dim

    @property
    def shared_test_ids(self) -> np.ndarray:
        return self.world["shared"]

    def subject_image_ids(self, subject: int) -> np.ndarray:
        return np.sort(np.concatenate([self.world["shared"], self.world["unique"][subject - 1]]))

    # -- images -------------------------------------------------------------------------
    def render(self, image_id: int, size: int | None = None, nuisance: bool = True) -> np.ndarray:
        """One RGB image, uint8 (H, W, 3) (float in [0, 1] without the nuisance texture)."""
        w, p = self.world, self.preset
        r = w["render"]
        s = size or p.image_size
        yy, xx = np.meshgrid(np.linspace(0, 1, s), np.linspace(0, 1, s), indexing="ij")
        zl, zs = w["z_low"][image_id], w["z_sem"][image_id]
        bg = _sigmoid(zl @ r["w_bg"]).reshape(2, 3)
        angle = math.atan2(zl[0], zl[1] if len(zl) > 1 else 1.0)
        ramp = np.clip(0.5 + (xx - 0.5) * math.cos(angle) + (yy - 0.5) * math.sin(angle), 0, 1)[..., None]
        img = bg[0] * (1 - ramp) + bg[1] * ramp
        tint = 0.25 * np.tanh(zs @ r["w_col"])
        for slot, c in enumerate(w["cat_lists"][image_id]):
            cy, cx = 0.18 + 0.64 * _sigmoid(zl @ r["w_pos"][slot])
            size = 0.12 + 0.14 * _sigmoid(zl @ r["w_size"][slot])
            dy, dx = yy - cy, xx - cx
            shape = SHAPES[w["shapes"][c]]
            if shape == "disc":
                d = np.sqrt(dy**2 + dx**2) / size
            elif shape == "square":
                d = np.maximum(abs(dy), abs(dx)) / size
            elif shape == "ring":
                d = abs(np.sqrt(dy**2 + dx**2) / size - 0.75) * 4
            elif shape == "diamond":
                d = (abs(dy) + abs(dx)) / (1.3 * size)
            else:  # stripes inside a disc
                d = np.sqrt(dy**2 + dx**2) / size + 0.5 * (np.sin(dx * 40) > 0)
            alpha = np.clip((1.0 - d) * s * size * 0.5, 0, 1)[..., None]
            color = np.clip(w["colors"][c] + tint, 0, 1)
            img = img * (1 - alpha) + color * alpha
        if not nuisance:
            return np.clip(img, 0, 1)
        # nuisance: a faint grating and pixel noise unrelated to z (the brain does not carry it)
        g = self.rng(4, image_id)
        fy, fx = g.uniform(2, 8, 2)
        img = img + 0.06 * np.sin(2 * math.pi * (fy * yy + fx * xx) + g.uniform(0, 6.3))[..., None]
        img = img + 0.03 * g.standard_normal(img.shape)
        return (np.clip(img, 0, 1) * 255).round().astype(np.uint8)

    def caption(self, image_id: int) -> str:
        names = [COCO_CATEGORIES[c] for c in self.world["cat_lists"][image_id]]
        words = [("an " if n[0] in "aeiou" else "a ") + n for n in names]
        body = words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]
        return f"a picture of {body}"

    def stimuli_table(self, image_ids: np.ndarray) -> pa.Table:
        from PIL import Image

        w = self.world
        pngs = []
        for i in image_ids:
            buf = io.BytesIO()
            Image.fromarray(self.render(int(i))).save(buf, format="PNG")
            pngs.append(buf.getvalue())
        shared = set(w["shared"].tolist())
        s = self.preset.image_size
        cats = w["cats"][image_ids]
        return pa.Table.from_pydict(
            {
                "image_id": pa.array(image_ids, pa.int32()),
                "image": pa.array(pngs, pa.binary()),
                "height": pa.array(np.full(len(image_ids), s), pa.int16()),
                "width": pa.array(np.full(len(image_ids), s), pa.int16()),
                "categories": pa.FixedSizeListArray.from_arrays(pa.array(cats.ravel(), pa.uint8()), N_CATEGORIES),
                "caption": [self.caption(int(i)) for i in image_ids],
                "shared": [int(i) in shared for i in image_ids],
            },
            schema=stimuli_schema(),
        )

    def stimulus_shards(self) -> list[np.ndarray]:
        ids = np.arange(self.preset.n_images)
        k = self.preset.images_per_shard
        return [ids[i : i + k] for i in range(0, len(ids), k)]

    # -- subjects -----------------------------------------------------------------------
    @staticmethod
    def template_coords(coords: np.ndarray) -> np.ndarray:
        """Voxel coordinates in the shared template space: the mask's bounding box mapped to [0, 1]^3."""
        lo, hi = coords.min(0), coords.max(0)
        return (coords - lo) / np.maximum(hi - lo, 1)

    @cached_property
    def template_fields(self) -> np.ndarray:
        """(features, g, g, g) smooth fields on the template grid, shared by all subjects."""
        rng = self.rng(6)
        g = 16
        k = self.shared_features.shape[1]
        return np.stack([gaussian_filter(rng.standard_normal((g + 1,) * 3), sigma=2.0) for _ in range(k)])

    def subject(self, subject: int) -> Subject:
        p = self.preset
        v = p.voxels[subject - 1]
        rng = self.rng(1, subject)
        gx, gy, gz = p.grid_shape
        ii, jj, kk = np.meshgrid(np.arange(gx), np.arange(gy), np.arange(gz), indexing="ij")
        # two posterior ellipsoids (left/right visual cortex), jittered per subject
        score = np.full(ii.shape, np.inf)
        for side in (0.3, 0.7):
            c = np.array([gx * side, gy * 0.3, gz * 0.45]) + rng.normal(0, 0.04, 3) * np.array(p.grid_shape)
            rad = np.array([gx * 0.17, gy * 0.3, gz * 0.28]) * rng.uniform(0.85, 1.15, 3)
            d = ((ii - c[0]) / rad[0]) ** 2 + ((jj - c[1]) / rad[1]) ** 2 + ((kk - c[2]) / rad[2]) ** 2
            score = np.minimum(score, d)
        flat = score.ravel()
        chosen = np.sort(np.argsort(flat, kind="stable")[:v])  # exactly v voxels, C order like NSD masks
        coords = np.stack(np.unravel_index(chosen, p.grid_shape), 1)
        # ROIs along the posterior-anterior axis, then ventral / lateral / parietal
        rank = np.argsort(np.argsort(coords[:, 1], kind="stable"), kind="stable") / max(v - 1, 1)
        roi = np.where(rank < 0.15, "V1", np.where(rank < 0.30, "V2", np.where(rank < 0.42, "V3", np.where(rank < 0.52, "hV4", ""))))
        kmed = np.median(coords[:, 2])
        roi = np.where(roi != "", roi, np.where(coords[:, 2] < kmed, "ventral", np.where(rank > 0.8, "parietal", "lateral")))
        # spatially smooth loadings. Brains are roughly alike after an affine alignment (the
        # same retinotopy, the same category-selective patches), so each map mixes one field in a
        # shared template space (coordinates normalised by the mask's bounding box) with a
        # subject-specific field.
        lo, hi = coords.min(0), coords.max(0) + 1
        box = tuple(hi - lo)
        local = coords - lo
        template = self.template_coords(coords)
        k = self.shared_features.shape[1]
        fields = self.template_fields
        tg = fields.shape[1] - 1
        maps = np.empty((v, k), np.float32)
        for j in range(k):
            shared = map_coordinates(fields[j], (template * tg).T, order=1)
            own = gaussian_filter(rng.standard_normal(box), sigma=1.5)[local[:, 0], local[:, 1], local[:, 2]]
            m = p.anatomical_similarity * (shared - shared.mean()) / (shared.std() + 1e-8)
            m = m + (1 - p.anatomical_similarity) * (own - own.mean()) / (own.std() + 1e-8)
            maps[:, j] = (m - m.mean()) / (m.std() + 1e-8)
        gain_field = gaussian_filter(rng.standard_normal(box), sigma=2.0)
        g = gain_field[local[:, 0], local[:, 1], local[:, 2]]
        gain = 0.4 + 0.6 * _sigmoid(3 * (g - g.mean()) / (g.std() + 1e-8))
        # early visual cortex carries the low-level part, higher areas the semantic part
        early = np.isin(roi, ["V1", "V2", "V3", "hV4"])
        weight = np.ones((v, k), np.float32)
        weight[:, : self.n_semantic] = np.where(early, 0.35, 1.0)[:, None]
        weight[:, self.n_semantic :] = np.where(early, 1.0, 0.35)[:, None]
        loadings = (maps * weight * gain[:, None] / math.sqrt(k / 2)).astype(np.float32)
        return Subject(subject, coords, roi, loadings, float(rng.uniform(0.85, 1.15)))

    def schedule(self, subject: int) -> Trial:
        """Every trial of a subject in presentation order (images shuffled, each shown ``repetitions`` times)."""
        p = self.preset
        rng = self.rng(2, subject)
        ids = np.repeat(self.subject_image_ids(subject), p.repetitions)
        ids = ids[rng.permutation(len(ids))][: p.sessions[subject - 1] * p.trials_per_session]
        rep = repetitions(ids)
        idx = np.arange(len(ids))
        session = idx // p.trials_per_session + 1
        in_session = idx % p.trials_per_session
        run_of = np.concatenate(
            [np.full(len(c), r + 1) for r, c in enumerate(np.array_split(np.arange(p.trials_per_session), p.runs_per_session))]
        )
        run_start = np.concatenate(
            [np.full(len(c), c[0]) for c in np.array_split(np.arange(p.trials_per_session), p.runs_per_session)]
        )
        return Trial(
            session=session.astype(np.int16),
            run=run_of[in_session].astype(np.int16),
            trial=(in_session + 1).astype(np.int32),
            image_id=ids.astype(np.int32),
            repetition=rep,
            onset_s=(LEAD_IN_S + (in_session - run_start[in_session]) * TRIAL_S).astype(np.float32),
        )

    def _session(self, subject: int, session: int, subj: Subject | None = None, sched: Trial | None = None):
        """(trial selector, neural responses, betas) of one session: the same draws feed betas and BOLD."""
        p = self.preset
        subj = subj or self.subject(subject)
        sched = sched or self.schedule(subject)
        sel = np.flatnonzero(sched.session == session)
        f = self.shared_features[sched.image_id[sel]]
        rng = self.rng(3, subject, session)
        neural = f @ subj.loadings.T + subj.noise_scale * p.trial_noise * rng.standard_normal((len(sel), len(subj.coords)))
        betas = neural + subj.noise_scale * p.beta_noise * rng.standard_normal(neural.shape)
        return sel, neural.astype(np.float32), betas.astype(np.float32)

    def trials_table(self, subject: int, session: int, subj: Subject | None = None, sched: Trial | None = None) -> pa.Table:
        sched = sched or self.schedule(subject)
        sel, _, betas = self._session(subject, session, subj, sched)
        shared = np.isin(sched.image_id[sel], self.world["shared"])
        v = betas.shape[1]
        return pa.Table.from_pydict(
            {
                "subject": pa.array(np.full(len(sel), subject), pa.int16()),
                "session": pa.array(sched.session[sel], pa.int16()),
                "run": pa.array(sched.run[sel], pa.int16()),
                "trial": pa.array(sched.trial[sel], pa.int32()),
                "image_id": pa.array(sched.image_id[sel], pa.int32()),
                "repetition": pa.array(sched.repetition[sel], pa.int8()),
                "split": np.where(shared, "test", "train").tolist(),
                "onset_s": pa.array(sched.onset_s[sel], pa.float32()),
                "betas": pa.FixedSizeListArray.from_arrays(pa.array(betas.astype(np.float16).ravel(), pa.float16()), v),
            },
            schema=trials_schema(v),
        )

    def timeseries_table(self, subject: int, session: int, subj: Subject | None = None, sched: Trial | None = None) -> pa.Table:
        """One row per run: HRF-convolved responses + slow drift + noise, voxel x time."""
        p = self.preset
        subj = subj or self.subject(subject)
        sched = sched or self.schedule(subject)
        sel, neural, _ = self._session(subject, session, subj, sched)
        rng = self.rng(5, subject, session)
        hrf = _hrf_integral()
        v = len(subj.coords)
        rows: dict[str, list] = {k: [] for k in timeseries_schema().names}
        for run in np.unique(sched.run[sel]):
            r = np.flatnonzero(sched.run[sel] == run)
            onsets = sched.onset_s[sel][r].astype(np.float64)
            n_tr = int(math.ceil((onsets.max() + TRIAL_S + TAIL_S) / p.tr_s))
            t = np.arange(n_tr) * p.tr_s
            x = hrf(t[:, None] - onsets[None]) - hrf(t[:, None] - onsets[None] - STIM_S)  # (T, trials)
            bold = x @ neural[r]
            # slow drift: low-frequency cosines (periods > 100 s) with voxel-specific weights
            n_drift = 3
            basis = np.stack([np.cos(math.pi * (q + 1) * (t + 0.5 * p.tr_s) / (n_tr * p.tr_s)) for q in range(n_drift)], 1)
            bold += basis @ (0.5 * rng.standard_normal((n_drift, v)))
            bold += subj.noise_scale * p.bold_noise * rng.standard_normal(bold.shape)
            design = np.full(n_tr, -1, np.int32)
            design[np.minimum((onsets // p.tr_s).astype(int), n_tr - 1)] = sched.image_id[sel][r]
            rows["subject"].append(subject)
            rows["session"].append(session)
            rows["run"].append(int(run))
            rows["tr_s"].append(p.tr_s)
            rows["n_voxels"].append(v)
            rows["n_tr"].append(n_tr)
            rows["bold"].append(pa.array(bold.T.astype(np.float16).ravel(), pa.float16()))
            rows["design"].append(design)
            rows["trial"].append(sched.trial[sel][r])
            rows["trial_onset_s"].append(onsets.astype(np.float32))
            rows["trial_image_id"].append(sched.image_id[sel][r])
        return pa.Table.from_pydict(rows, schema=timeseries_schema())

    def voxels_table(self, subject: int, subj: Subject | None = None) -> pa.Table:
        subj = subj or self.subject(subject)
        c = subj.coords
        return pa.Table.from_pydict(
            {
                "voxel": pa.array(np.arange(len(c)), pa.int32()),
                "i": pa.array(c[:, 0], pa.int16()),
                "j": pa.array(c[:, 1], pa.int16()),
                "k": pa.array(c[:, 2], pa.int16()),
                "roi": subj.roi.tolist(),
            },
            schema=voxels_schema().with_metadata({"grid_shape": ",".join(map(str, self.preset.grid_shape))}),
        )

    def subject_info(self, subject: int) -> SubjectInfo:
        p = self.preset
        sched = self.schedule(subject)
        shared = np.isin(sched.image_id, self.world["shared"])
        return SubjectInfo(
            subject=subject,
            voxels=p.voxels[subject - 1],
            grid_shape=p.grid_shape,
            sessions=p.sessions[subject - 1],
            runs=p.sessions[subject - 1] * p.runs_per_session,
            trials={"train": int((~shared).sum()), "test": int(shared.sum())},
            images={"train": int(len(np.unique(sched.image_id[~shared]))), "test": int(len(np.unique(sched.image_id[shared])))},
        )
