"""Top-k recommendations from the per-user state: the EMDE recipe on the worker's sketches.

A shallow MLP reads the user's decayed EMDE sketches as they stand *before* an event (the
very ``Features.user_sketch`` the aggregator returns to the worker and the trainer; never the
event item's own columns) and predicts the sketch of the event's item: per codebook and depth
level a softmax over the ``width`` buckets (an L1-normalised sketch), trained with per-level
cross-entropy. Decoding ranks every catalogue item by ``sum over levels log p[level,
bucket(item)]`` (the geometric mean of its level probabilities), vectorised over the catalogue
with a precomputed ``(n_items, levels)`` bucket index: :class:`~.catalogue.Catalogue`, in a
module of its own with its top-k, importable from here too.

    spec = InputSpec.build(aggregator.config, config, aggregator.depth, aggregator.width)
    x, codes = replay_inputs(events, aggregator, keep, spec)   # (n, F) float16, (n, M, D)
    model, history = fit_recommender(x[tr], codes[tr], val, catalogue, config)
    ids, scores = catalogue.top_k(model.log_probs(x_user), k=10, exclude=seen)

Online, the same inputs come from a user's state: :func:`user_inputs` on the features read
with ``with_sketches`` and :func:`state_last_codes` on the state's bounded history.

:func:`~sketchstream.models.ranking.recommend_report` runs the whole offline comparison (this
model, recent popularity, item-item CF and SASRec on the test period's events) and returns the
``"recommend"`` block of ``report.json``.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sketchstream.models import kernels
from sketchstream.models.batches import EventBatch
from sketchstream.models.catalogue import Catalogue
from sketchstream.models.channels import AggregatorConfig
from sketchstream.models.emde import normalize
from sketchstream.models.errors import ModelError
from sketchstream.models.mlp import FixedProduct, fixed_layers, fixed_scales
from torch import nn

__all__ = [
    "REC_PRODUCTS",
    "SPILL_BYTES",
    "Catalogue",
    "InputSpec",
    "RecommendConfig",
    "SketchRecommender",
    "StoredInputs",
    "fit_recommender",
    "input_array",
    "recent_sketches",
    "replay_inputs",
    "replay_stored",
    "state_last_codes",
    "stream_last_codes",
    "to_float16",
    "user_inputs",
]

log = logging.getLogger(__name__)

#: ``RecommendConfig.products``: how the recommender's matrix products run when it serves
REC_PRODUCTS = ("float32", "int8")

#: Training rows ``calibrate_products`` reads (a seeded sample: the inputs are wide)
CALIBRATION_ROWS = 50_000
#: Stored inputs larger than this (bytes) go to a memory-mapped file when the caller gives a
#: folder (:func:`replay_stored`): the recommender trains on every event of the training period
SPILL_BYTES = 2 << 30
#: Disk a spill leaves free beyond its file (bytes)
SPILL_MARGIN = 1 << 30


@dataclass(frozen=True)
class RecommendConfig:
    """Inputs, shape and training of the recommendation head; saved with the model."""

    # input sketches: groups of state channels, each group's sketches summed into one input
    # sketch (None: every channel on its own)
    inputs: tuple[tuple[str, ...], ...] | None = None
    user_columns: bool = True  # the state's counts (mass per channel, hours since last, events)
    # sketches of the user's last `recent_length` items in the state's bounded history, one per
    # decay g (the newest item weighs 1, the one before g, then g^2, ...) and modality
    # (on MovieLens-1M these sketches lift validation NDCG@10 from 0.043 to 0.119; four
    # decays, from about the last item alone to the last 50, over 0.5 and 0.8: 0.1022 against
    # 0.0965 after one epoch, 0.1168 against 0.1110 after two, 0.1201 against 0.1145 after
    # three, on the last 300,000 events)
    recent_decays: tuple[float, ...] = (0.1, 0.5, 0.8, 0.95)
    recent_length: int = 50
    targets: tuple[str, ...] | None = None  # modalities whose sketch is predicted (None: all)
    # the predicted sketch's own codebooks: the same Cleora item embeddings as the state's,
    # partitioned into `target_depth` levels of `target_width` buckets per target modality
    # (None: the state's codebooks). The state's 64 buckets hold ~57 of MovieLens-1M's 3,662
    # items each, and decoding cannot tell them apart; finer buckets can. Validation NDCG@10
    # after one epoch on the last 300,000 events: 0.1022 with the state's 12 x 64, 0.1193
    # with 12 x 256, 0.1293 with 12 x 512
    target_depth: int | None = 12
    target_width: int | None = 512
    hidden: int = 1024  # ML-1M validation NDCG@10: 512 x 1 block 0.119, 1024 x 2 blocks 0.127
    blocks: int = 2  # residual blocks after the input layer
    dropout: float = 0.1
    # upper bound; early stopping on validation NDCG@10 (ML-1M: best at 5 on the last 300,000
    # events, at 3 of 5 on the whole training period)
    epochs: int = 8
    # the last N events of the training period it learns from (None: all of them, as SASRec
    # and item-CF do). ML-1M, the last 300,000 (the bound until now) against the last
    # 600,000: validation NDCG@10 0.1179 / 0.1277, test HR@10 0.1305 / 0.1428
    train_events: int | None = None
    patience: int = 2  # validation checks without gain before stopping
    lr: float = 1e-3
    weight_decay: float = 0.0
    batch_size: int = 512
    seed: int = 0
    # how the served model's matrix products run (see SketchRecommender): "int8" weights
    # with 16-bit fixed-point inputs, calibrated after training, or "float32" (artifacts
    # from before this field are float32)
    products: str = "int8"

    def __post_init__(self) -> None:
        if self.train_events is not None and self.train_events < 1:
            raise ModelError(f"recommend train_events must be >= 1, got {self.train_events}")
        if (self.target_depth is None) != (self.target_width is None):
            raise ModelError(
                "recommend target_depth and target_width go together: both set (the "
                "recommender's own codebooks) or both None (the state's)"
            )
        if self.target_depth is not None and self.target_depth < 1:
            raise ModelError(f"recommend target_depth must be >= 1, got {self.target_depth}")
        if self.target_width is not None and not 2 <= self.target_width <= 32767:
            raise ModelError(
                f"recommend target_width must be in [2, 32767], got {self.target_width}"
            )
        if self.products not in REC_PRODUCTS:
            raise ModelError(
                f"recommend products must be one of {', '.join(REC_PRODUCTS)}, "
                f"got {self.products!r}"
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class InputSpec:
    """Where each input column comes from, in order: ``groups`` (channel indices summed per
    input sketch), the count columns (``user_columns``), then the recent-item sketches
    (``recent_decays`` × ``modalities``); the state's depth and width."""

    groups: tuple[tuple[int, ...], ...]
    user_columns: bool
    n_counts: int
    depth: int
    width: int
    # (on MovieLens-1M these sketches lift validation NDCG@10 from 0.043 to 0.119)
    recent_decays: tuple[float, ...] = (0.5, 0.8)
    recent_length: int = 50
    modalities: int = 1

    @classmethod
    def build(
        cls, config: AggregatorConfig, rec: RecommendConfig, depth: int, width: int
    ) -> InputSpec:
        names = [c.name for c in config.channels]
        wanted = rec.inputs if rec.inputs is not None else tuple((n,) for n in names)
        groups = []
        for g in wanted:
            unknown = [n for n in g if n not in names]
            if unknown or not g:
                raise ModelError(
                    f"recommend inputs: unknown channels {unknown or g}: expected some of "
                    f"{', '.join(names)}"
                )
            groups.append(tuple(names.index(n) for n in g))
        if rec.recent_decays and not 1 <= rec.recent_length <= config.history_size:
            raise ModelError(
                f"recent_length {rec.recent_length} must be in [1, history_size "
                f"{config.history_size}]: the recent items come from the state's history"
            )
        if any(not 0.0 < g <= 1.0 for g in rec.recent_decays):
            raise ModelError(f"recent_decays must lie in (0, 1], got {rec.recent_decays}")
        return cls(
            tuple(groups),
            rec.user_columns,
            len(config.count_names),
            depth,
            width,
            tuple(rec.recent_decays),
            rec.recent_length,
            len(config.modalities),
        )

    @property
    def n_features(self) -> int:
        cells = self.depth * self.width
        return (
            len(self.groups) * cells
            + (self.n_counts if self.user_columns else 0)
            + len(self.recent_decays) * self.modalities * cells
        )


def recent_sketches(last_codes: np.ndarray, decays: Sequence[float], width: int) -> np.ndarray:
    """Decayed sketches of each user's last items, L2-normalised per level:
    ``(B, len(decays) * M * D * width)`` float32 from ``last_codes (B, L, M, D)`` (oldest
    first; -1: no item, or unknown to that modality)."""
    c = np.asarray(last_codes, np.int64)
    b, length, m, d = c.shape
    age = np.arange(length - 1, -1, -1, dtype=np.float64)
    if kernels.ENABLED and decays and c.size:  # compiled (the same bits), this is its reference
        weights = np.stack([g**age for g in decays])
        out = np.empty((b, len(decays), m, d, width), np.float32)
        kernels.recent_sketches(np.ascontiguousarray(c), weights, width, out)
        return out.reshape(b, -1)
    known = c >= 0
    # each code's output cell, by broadcasting and one mask (in C order, as np.nonzero goes,
    # so the sums add up in the same order): 4-D fancy indexing was most of the time
    row = (np.arange(b)[:, None, None, None] * m + np.arange(m)[:, None]) * d + np.arange(d)
    cell = (row * width + c)[known]
    out = []
    for g in decays:
        weights = np.broadcast_to((g**age)[:, None, None], c.shape)[known]
        acc = np.bincount(cell, weights=weights, minlength=b * m * d * width)
        out.append(normalize(acc.reshape(b, m, d, width).astype(np.float32)).reshape(b, -1))
    return np.concatenate(out, axis=1) if out else np.zeros((b, 0), np.float32)


def stream_last_codes(
    item_codes: np.ndarray, history: Any, events: np.ndarray, length: int
) -> np.ndarray:
    """Offline: ``(B, length, M, D)`` codes of each event's user's last ``length`` items
    before it, from ``item_codes (n, M, D)`` (every stream event's buckets) and a
    :class:`~sketchstream.models.ranking.UserHistory` over stream rows."""
    last = history.last(events, length)
    out = np.asarray(item_codes)[np.maximum(last, 0)].astype(np.int64)
    out[last < 0] = -1
    return out


def state_last_codes(
    state: Any, users: np.ndarray, codebooks: Sequence[Any], length: int
) -> np.ndarray:
    """Online: the same ``(B, length, M, D)`` codes read off the users' states (their bounded
    histories, by time then fold order; ``codebooks`` in modality order)."""
    users = np.asarray(users, np.int64)
    k = state.hist_item.shape[1]
    slot = np.arange(k)[None, :]
    used = slot < state.hist_len[users][:, None]
    # slots rank newest first among equal weights; sort each history by time, oldest first
    ts = np.where(used, state.hist_ts[users], np.inf)
    order = np.lexsort((-slot.repeat(len(users), 0), ts), axis=1)
    n_used = used.sum(axis=1)
    take = np.arange(length)[None, :] + (n_used[:, None] - length)  # the last `length` used
    ok = take >= 0
    pick = np.take_along_axis(order, np.maximum(take, 0), axis=1)
    hashes = np.take_along_axis(state.hist_item[users], pick, axis=1)
    codes = np.stack(
        [cb._codes_at(cb.rows_for_hashes(hashes.reshape(-1))) for cb in codebooks], axis=1
    ).reshape(len(users), length, len(codebooks), -1)
    codes = codes.astype(np.int64)
    codes[~ok] = -1
    return codes


def user_inputs(features: Any, spec: InputSpec, last_codes: np.ndarray | None = None) -> np.ndarray:
    """The model's input ``(n, spec.n_features)`` float16 from the aggregator's ``Features``
    (read with ``with_sketches``): per group the summed sketches L2-normalised per depth, then
    ``log1p`` of the counts, then the :func:`recent_sketches` of ``last_codes (n, L, M, D)``
    (needed when ``spec.recent_decays``). float16 is part of the definition (training stores
    it, serving casts the same way), so both read identical values."""
    sk = features.user_sketch
    if sk is None:
        raise ModelError("user_inputs: the features carry no user sketches (with_sketches)")
    n = sk.shape[0]
    parts = [normalize(sk[:, list(g)].sum(axis=1)).reshape(n, -1) for g in spec.groups]
    if spec.user_columns:
        parts.append(np.log1p(np.maximum(np.asarray(features.counts, np.float32), 0.0)))
    if spec.recent_decays:
        if last_codes is None:
            raise ModelError("user_inputs: recent_decays need the users' last item codes")
        parts.append(recent_sketches(last_codes, spec.recent_decays, spec.width))
    return to_float16(np.concatenate(parts, axis=1))


def input_array(
    name: str,
    shape: tuple[int, ...],
    dtype: Any,
    spill: str | os.PathLike[str] | None = None,
) -> np.ndarray:
    """A zeroed array for stored inputs: in memory, or past :data:`SPILL_BYTES` with
    ``spill`` given, a memory-mapped file ``<name>.npy`` in that folder (the operating system
    keeps what fits of it in its page cache)."""
    size = int(np.prod(shape)) * np.dtype(dtype).itemsize
    if spill is None or size <= SPILL_BYTES:
        return np.zeros(shape, dtype)
    path = Path(spill) / f"{name}.npy"
    free = shutil.disk_usage(path.parent).free
    if free < size + SPILL_MARGIN:
        # a memory map past the disk's end fails with SIGBUS, not an error: refuse first
        raise ModelError(
            f"recommend: {shape[0]:,} events' {name} need {size / 1e9:.1f} GB in {spill}, "
            f"{free / 1e9:.1f} GB free: point TMPDIR at a larger disk, or train on fewer "
            "events (--recommender-train-events)"
        )
    log.info("recommend: %s %s (%.1f GB) spill to %s", name, shape, size / 1e9, path)
    return np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)


def to_float16(x: np.ndarray) -> np.ndarray:
    """``x`` float32 cast to float16 exactly as ``x.astype(np.float16)`` rounds it (to
    nearest, ties to even), by torch: ~50x faster, numpy casts one value at a time."""
    return torch.from_numpy(np.ascontiguousarray(x, np.float32)).half().numpy()


@dataclass(frozen=True)
class StoredInputs:
    """Many events' inputs, held compactly: per event the state part of its input (the
    group sketches and counts, ``base (k, F0)`` float16) and the codes of its user's last
    items (``last (k, L, M, D)`` int16, None without ``recent_decays``), from which the
    recent-item sketches are made when rows are read. ``x[rows]`` is the ``(len(rows), F)``
    float16 input of :func:`user_inputs`, the same values (each row's sketches are its own).

    On MovieLens-1M an event's input is 26 KB with the default four decays, its stored form
    16 KB: the whole training period (800,167 events) fits where the full inputs would not."""

    spec: InputSpec
    base: np.ndarray  # with ``last`` None: the whole inputs
    last: np.ndarray | None

    def __len__(self) -> int:
        return len(self.base)

    @property
    def shape(self) -> tuple[int, int]:
        return len(self.base), self.base.shape[1] if self.last is None else self.spec.n_features

    def __getitem__(self, rows: slice | np.ndarray) -> np.ndarray:
        base = np.asarray(self.base[rows])
        if self.last is None:
            return base
        recent = recent_sketches(
            np.asarray(self.last[rows]), self.spec.recent_decays, self.spec.width
        )
        return np.concatenate([base, to_float16(recent)], axis=1)

    def part(self, start: int, stop: int) -> StoredInputs:
        """Rows ``start:stop`` (views, no copy)."""
        last = None if self.last is None else self.last[start:stop]
        return StoredInputs(self.spec, self.base[start:stop], last)


def replay_inputs(
    events: Any, aggregator: Any, keep: np.ndarray, spec: InputSpec, **options: Any
) -> tuple[np.ndarray, np.ndarray]:
    """Score-then-fold the whole stream through ``aggregator`` (the worker's call) and keep,
    for the rows where ``keep (n,)`` is set, the user inputs read before each event and the
    event item's buckets: ``(x (k, F) float16, codes (k, M, D) int16)``, in stream order.
    Batches without a kept row fold without reading sketches (the cheap path). ``options``:
    :func:`replay_stored`'s ``batch_size`` and ``progress``; for many rows, it keeps them
    compactly."""
    stored, codes = replay_stored(events, aggregator, keep, spec, **options)
    return stored[slice(None)], codes


def replay_stored(
    events: Any,
    aggregator: Any,
    keep: np.ndarray,
    spec: InputSpec,
    *,
    batch_size: int = 1024,
    progress: bool = False,
    spill: str | os.PathLike[str] | None = None,
) -> tuple[StoredInputs, np.ndarray]:
    """:func:`replay_inputs` with the inputs as :class:`StoredInputs`.

    ``spill``: a folder where the stored arrays are written as memory-mapped ``.npy`` files
    instead of held in memory, each once it is larger than :data:`SPILL_BYTES` (MovieLens-1M's
    whole training period: 11 GB of state inputs, 1.9 GB of last items); the caller removes
    the folder when done with them."""
    from tqdm.auto import tqdm

    n = len(events)
    keep = np.asarray(keep, dtype=bool)
    if keep.shape != (n,):
        raise ModelError(f"replay_inputs: keep has shape {keep.shape}, expected ({n},)")
    _, user_index = np.unique(events.user.astype(str), return_inverse=True)
    action_of = {a: k for k, a in enumerate(aggregator.config.actions)}
    action = np.array([action_of.get(a, -1) for a in events.action.astype(str).tolist()])
    state = aggregator.new_batch(int(user_index.max()) + 1 if n else 0)
    k_rows, m = int(keep.sum()), len(aggregator.modalities)
    base_spec = replace(spec, recent_decays=())
    base = input_array("inputs", (k_rows, base_spec.n_features), np.float16, spill)
    last = None
    if spec.recent_decays:
        from sketchstream.models.ranking import UserHistory

        history = UserHistory(events.user, np.arange(n))
        all_codes = np.stack(
            [cb.encode(events.item.tolist()) for cb in aggregator.codebooks.values()], axis=1
        )
        last = input_array("last", (k_rows, spec.recent_length, m, spec.depth), np.int16, spill)
    codes = np.full((k_rows, m, spec.depth), -1, np.int16)
    done = 0
    bar = tqdm(total=n, desc="replay", unit="ev", disable=not progress, mininterval=2.0)
    for start in range(0, n, batch_size):
        rows = slice(start, min(start + batch_size, n))
        batch = EventBatch.from_table(events, rows, user_index=user_index, action=action)
        k = keep[rows]
        feats = aggregator.score_then_fold(state, batch, with_sketches=bool(k.any()))
        if k.any():
            got = feats.take(np.flatnonzero(k))
            at = slice(done, done + len(got.valid))
            base[at] = user_inputs(got, base_spec)
            if last is not None:
                where = start + np.flatnonzero(k)
                last[at] = stream_last_codes(all_codes, history, where, spec.recent_length)
            codes[at] = got.item_codes
            done += len(got.valid)
        bar.update(rows.stop - rows.start)
    bar.close()
    return StoredInputs(spec, base, last), codes


class _Block(nn.Module):
    def __init__(self, hidden: int, dropout: float) -> None:
        super().__init__()
        self.fc = nn.Linear(hidden, hidden)
        self.norm = nn.LayerNorm(hidden)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop(nn.functional.leaky_relu(self.norm(self.fc(x))))


class SketchRecommender(nn.Module):
    """User inputs ``(n, n_in)`` → per-level logits ``(n, levels, width)``.

    Inputs are standardised with training statistics (buffers saved with the weights), then
    Linear → LayerNorm → LeakyReLU, ``blocks`` residual blocks, and one linear output layer.
    """

    def __init__(
        self,
        n_in: int,
        levels: int,
        width: int,
        *,
        hidden: int,
        blocks: int,
        dropout: float,
        products: str = "float32",
    ) -> None:
        super().__init__()
        if products not in REC_PRODUCTS:
            raise ModelError(f"SketchRecommender: products {products!r}, expected {REC_PRODUCTS}")
        self.levels, self.width, self.products = levels, width, products
        self.register_buffer("mean", torch.zeros(n_in))
        self.register_buffer("std", torch.ones(n_in))
        self.inp = nn.Linear(n_in, hidden)
        self.norm = nn.LayerNorm(hidden)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(_Block(hidden, dropout) for _ in range(blocks))
        self.out = nn.Linear(hidden, levels * width)
        self._int8: list[FixedProduct] | None = None  # int8 only: Int8Layer
        if products == "int8":  # each product's input scales; 0 until calibrate_products
            for i, layer in enumerate(self._product_layers()):
                self.register_buffer(f"fixed_scale_{i}", torch.zeros(layer.in_features))
            # new weights or scales: the int8 tables are built again
            self.register_load_state_dict_post_hook(lambda module, _keys: module._forget_int8())

    def set_normalization(self, x: np.ndarray, chunk: int = 4096) -> None:
        """Fit the input standardisation on training rows ``(n, n_in)`` (chunk by chunk: the
        inputs are float16 and wide, a float64 copy of them all would not fit)."""
        n = len(x)
        total = np.zeros(x.shape[1])
        squares = np.zeros(x.shape[1])
        for a in range(0, n, chunk):
            c = np.asarray(x[a : a + chunk], np.float64)
            total += c.sum(axis=0)
            squares += np.square(c).sum(axis=0)
        mean = total / max(n, 1)
        std = np.sqrt(np.maximum(squares / max(n, 1) - mean**2, 0.0))
        self.mean.copy_(torch.from_numpy(mean.astype(np.float32)))
        self.std.copy_(torch.from_numpy(np.where(std > 1e-4, std, 1.0).astype(np.float32)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp((x.float() - self.mean) / self.std)
        h = self.drop(nn.functional.leaky_relu(self.norm(h)))
        for block in self.blocks:
            h = block(h)
        return self.out(h).view(-1, self.levels, self.width)

    def log_probs(self, x: np.ndarray, batch_size: int = 4096) -> np.ndarray:
        """``(n, levels * width)`` float32 per-level log-probabilities, no autograd: the
        int8 products once calibrated (an ``"int8"`` model), else the float32 forward."""
        was = self.training
        if was:  # toggling walks every submodule: ~0.15 ms a call, a worker's every answer batch
            self.eval()
        layers = self._int8_layers()
        out = np.empty((len(x), self.levels * self.width), np.float32)
        try:
            with torch.inference_mode():
                for a in range(0, len(x), batch_size):
                    xb = _float32(x[a : a + batch_size])
                    logits = self(xb) if layers is None else self._int8_forward(xb, layers)
                    lp = torch.log_softmax(logits, dim=-1)
                    out[a : a + len(xb)] = lp.reshape(len(xb), -1).numpy()
        finally:
            if was:
                self.train()
        return out

    def warm_up(self) -> None:
        """Build the int8 products and compile their kernels and the inputs' normalization
        (or load them from numba's disk cache) on one row, so that a worker pays it when a
        model loads, not in its first answers."""
        normalize(np.zeros((1, 1, 8), np.float32))
        recent_sketches(np.full((1, 1, 1, 1), -1), (0.5,), 8)
        if self._int8_layers() is not None:
            self.log_probs(np.zeros((1, self.inp.in_features), np.float16))

    def _int8_forward(self, x: torch.Tensor, layers: list[FixedProduct]) -> torch.Tensor:
        """:meth:`forward` in eval mode with each linear's product in int8
        (:class:`~.mlp.Int8Layer`): compiled, or its torch reference without the JIT (the
        same bits)."""

        def linear(i: int, h: torch.Tensor) -> torch.Tensor:
            layer, bias = layers[i], self._product_layers()[i].bias
            if not kernels.ENABLED:
                return layer.reference(h) + bias
            out = np.empty((len(h), len(layer.scale)), np.float32)
            layer.product(np.ascontiguousarray(h.numpy(), dtype=np.float32), out)
            return torch.from_numpy(out) + bias

        h = nn.functional.leaky_relu(self.norm(linear(0, (x - self.mean) / self.std)))
        for i, block in enumerate(self.blocks, start=1):
            h = h + nn.functional.leaky_relu(block.norm(linear(i, h)))
        return linear(len(layers) - 1, h).view(-1, self.levels, self.width)

    def _product_layers(self) -> list[nn.Linear]:
        return [self.inp, *(block.fc for block in self.blocks), self.out]

    @property
    def calibrated(self) -> bool:
        """False for an ``"int8"`` model whose input scales are not set yet (True for
        ``"float32"``)."""
        return self.products != "int8" or self._int8_layers() is not None

    def calibrate_products(self, x: np.ndarray, batch_size: int = 4096) -> None:
        """Fix an ``"int8"`` model's input scales on training rows ``x (n, n_in)``, after
        training (:func:`~.mlp.fixed_scales`). From then on :meth:`log_probs` runs the int8
        products."""
        if self.products != "int8":
            raise ModelError(f"calibrate_products: products={self.products!r}")
        layers = self._product_layers()
        peaks = [torch.zeros(layer.in_features) for layer in layers]

        def peak(i: int) -> Any:
            def hook(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
                torch.maximum(peaks[i], args[0].abs().amax(dim=0), out=peaks[i])

            return hook

        hooks = [layer.register_forward_pre_hook(peak(i)) for i, layer in enumerate(layers)]
        was = self.training
        self.eval()
        try:
            with torch.inference_mode():
                for a in range(0, len(x), batch_size):
                    self(_float32(x[a : a + batch_size]))
        finally:
            for hook in hooks:
                hook.remove()
            self.train(was)
        for i, p in enumerate(peaks):
            getattr(self, f"fixed_scale_{i}").copy_(
                torch.from_numpy(fixed_scales(p.numpy(), "int8"))
            )
        self._forget_int8()

    def _int8_layers(self) -> list[FixedProduct] | None:
        """The int8 products (built from the weights and scales at first use); None: float32
        (a ``"float32"`` model, or an ``"int8"`` one not calibrated yet: in training)."""
        if self.products != "int8":
            return None
        if self._int8 is None:
            linears = self._product_layers()
            self._int8 = fixed_layers(
                "int8",
                [linear.weight.detach().numpy() for linear in linears],
                [getattr(self, f"fixed_scale_{i}").numpy() for i in range(len(linears))],
            )
        return self._int8

    def _forget_int8(self) -> None:
        self._int8 = None


def _float32(x: np.ndarray) -> torch.Tensor:
    """Inputs (float16, as stored) as a float32 tensor: the same values, by torch (numpy
    converts float16 one value at a time: 32 us a request at 9,226 inputs)."""
    return torch.from_numpy(np.ascontiguousarray(x)).float()


@dataclass
class Validation:
    """Early-stopping events: inputs ``x (n, F)``, catalogue ``target (n,)`` rows (-1
    outside), and ``exclude (n, n_items)`` bool (the users' seen items) or None."""

    x: np.ndarray
    target: np.ndarray
    exclude: np.ndarray | None


def _levels_target(codes: np.ndarray, modalities: Sequence[int], width: int) -> np.ndarray:
    """``(n, L)`` int64 bucket per level of the target modalities, -1 unknown."""
    c = np.asarray(codes)[:, list(modalities), :].reshape(len(codes), -1).astype(np.int64)
    return np.where((c >= 0) & (c < width), c, -1)


def fit_recommender(
    x: np.ndarray,
    codes: np.ndarray,
    val: Validation,
    catalogue: Catalogue,
    config: RecommendConfig,
    *,
    target_modalities: Sequence[int] = (0,),
    progress: bool = False,
) -> tuple[SketchRecommender, list[dict[str, float]]]:
    """Train on ``x (n, F)`` → the buckets ``codes (n, M, D)`` of ``target_modalities``;
    keep the weights with the best validation NDCG@10 (seen items excluded when
    ``val.exclude`` is given). Deterministic given ``config.seed`` (one torch thread)."""
    from sketchstream.models.ranking import ValidationStopper, rank_metrics

    width = catalogue.width
    y = _levels_target(codes, target_modalities, width)
    levels = y.shape[1]
    if catalogue.levels.shape[1] != levels:
        raise ModelError(
            f"fit_recommender: {levels} target levels, the catalogue has "
            f"{catalogue.levels.shape[1]}"
        )
    if len(x) == 0:
        raise ModelError("fit_recommender: no training events")
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    model = SketchRecommender(
        x.shape[1],
        levels,
        width,
        hidden=config.hidden,
        blocks=config.blocks,
        dropout=config.dropout,
        products=config.products,
    )
    sample = np.sort(rng.choice(len(x), min(len(x), CALIBRATION_ROWS), replace=False))
    model.set_normalization(x[sample])
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    y_t = torch.from_numpy(y)
    stopper = ValidationStopper("recommend", model, config.patience, progress)
    steps = -(-len(x) // config.batch_size)
    for _ in range(config.epochs):
        model.train()
        perm = rng.permutation(len(x))
        total = 0.0
        for b in range(steps):
            idx = np.sort(perm[b * config.batch_size : (b + 1) * config.batch_size])
            xb = _float32(x[idx])
            yb = y_t[idx]
            logits = model(xb)
            loss = nn.functional.cross_entropy(
                logits.reshape(-1, width), yb.reshape(-1), ignore_index=-1
            )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach())
        scores = catalogue.scores(model.log_probs(val.x))
        if stopper.epoch(total / steps, rank_metrics(scores, val.target, val.exclude)):
            break
    history = stopper.restore()
    if config.products == "int8":
        model.calibrate_products(x[sample])
        got = rank_metrics(catalogue.scores(model.log_probs(val.x)), val.target, val.exclude)
        best = max(history, key=lambda h: h.get("val_ndcg@10", -1.0), default={})
        log.info(
            "recommend: int8 products calibrated on %d training rows; validation NDCG@10 "
            "%.4f, HR@10 %.4f (float32 %.4f, %.4f)",
            len(sample),
            float(got["ndcg@10"].mean()) if len(got["ndcg@10"]) else float("nan"),
            float(got["hr@10"].mean()) if len(got["hr@10"]) else float("nan"),
            best.get("val_ndcg@10", float("nan")),
            best.get("val_hr@10", float("nan")),
        )
    return model, history
