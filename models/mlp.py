"""The engagement MLP: a small residual feed-forward network over sketch features.

One module, one ``forward`` for training and inference, a frozen config that travels with the
weights. Inputs come in two parts, built by :func:`assemble` from the aggregator's
:class:`~sketchstream.models.batches.Features` (the trainer and the worker call the same
function, so serving cannot drift from training):

* ``dense (n, n_dense)``: density features read off the user sketches, log-scaled counts and
  optional online item statistics; standardized inside the module with statistics fitted on
  the training rows (buffers, so they are saved with the weights);
* ``codes (n, modalities, depth)``: the target item's EMDE bucket per (modality, depth), ``-1``
  where unknown. The item sketch is one-hot per depth, so instead of a dense
  ``modalities × depth × width`` first layer the module sums one learned row per non-zero
  (``nn.EmbeddingBag(mode="sum")``, padding row for ``-1``): O(non-zeros), as the design asks.

Then ``blocks`` residual blocks (Linear → LayerNorm → LeakyReLU → dropout, plus the skip) and
one logit per engagement head; :meth:`EngagementMLP.predict` applies the sigmoid.

At inference the hidden layers' three matrix products are most of the MLP's time, and float32
products already run at the core's FMA peak. A ``products="int8"`` model (the trainer's
default; :class:`Int8Layer`) or ``"fixed16"`` one (:class:`FixedLayer`, two-byte weights)
computes them with 16-bit fixed-point inputs and exact integer sums on the CPU's int8 matrix
units; the inputs' scales are fixed on the training rows after
training (:meth:`EngagementMLP.calibrate_products`), not per batch, so the rows a score is
batched with move it no more than with float32 products (a last bit).
bfloat16 products were measured and refused: rounding an input to 8 bits turns the last-bit
differences that batching leaves in the decayed features into jumps of ~1e-4 in a score.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from scipy.special import expit
from sketchstream.models import kernels, mlp_kernels
from sketchstream.models.errors import ModelError
from torch import nn

if TYPE_CHECKING:
    from sketchstream.models.boost import HeadBoost

log = logging.getLogger(__name__)

__all__ = [
    "FIXED_HEADROOM",
    "PRODUCTS",
    "EngagementMLP",
    "FixedLayer",
    "FixedProduct",
    "Int8Layer",
    "MLPConfig",
    "MLPInputs",
    "assemble",
    "code_indices",
    "counts_columns",
    "fixed_layers",
    "fixed_scales",
    "int8_products_exact",
    "set_threads",
    "to_tensors",
    "user_rate_columns",
]


#: ``MLPConfig.products``: how the hidden layers' matrix products are computed at inference
PRODUCTS = ("float32", "fixed16", "int8")

#: ``calibrate_products``: a fixed-point input's range is this many times the largest
#: magnitude its column reached on the training rows (values beyond it are clipped)
FIXED_HEADROOM = 2.0

#: ``FixedLayer.product`` works through a batch this many rows at a time: the int32 sums of a
#: 2,000-event batch (8 MB at hidden 512) overflow the core's L2; by 256 rows the MLP of the
#: default model took 10.7-11.1 µs an event at batch 2,000 against 12.5-13.9 in one piece
FIXED_CHUNK = 256


@dataclass(frozen=True)
class MLPConfig:
    """Shape and regularization of :class:`EngagementMLP`. Saved in every model artifact."""

    n_dense: int = 0  # width of the dense block: density + counts + item stats
    modalities: int = 2  # codebooks whose item buckets feed the sparse first layer
    depth: int = 12  # codebook depth (buckets per item per modality)
    width: int = 64  # codebook width (buckets per depth)
    hidden: int = 512  # width of every residual block
    blocks: int = 2  # residual blocks after the input layer
    dropout: float = 0.1  # inside each block, training only
    leaky_slope: float = 0.01  # negative slope of LeakyReLU
    # > 0: the dense block also enters as its per-column empirical CDF over the training rows,
    # piecewise linear between this many quantiles (0: standardized values only, as before)
    quantiles: int = 0
    # > 0: the dense columns listed in ``binned`` also enter piecewise-linearly encoded over
    # this many bins between their training quantiles (a subset of the ``quantiles`` knots):
    # one input per bin, 0 below it, 1 above, linear inside (0: none, as before)
    bins: int = 0
    binned: tuple[int, ...] = ()
    # > 1: that many networks of this shape, trained side by side from their own initial
    # weights, the logits averaged (1: one network, as before)
    members: int = 1
    # the dense block carries user_rate_columns (the user's like rates read off the channel
    # masses); False for artifacts trained before them
    user_rates: bool = False
    heads: tuple[str, ...] = ("like",)  # one sigmoid output per engagement type
    dense_names: tuple[str, ...] = field(default=())  # names of the dense columns, for reports
    # how predict computes the hidden layers' matrix products: "float32" (BLAS), "fixed16":
    # inputs and weights as 16-bit fixed point (two int8 digits each, the inputs' scales
    # fixed on the training rows by EngagementMLP.calibrate_products), exact integer sums, or
    # "int8": the same inputs, one int8 digit a weight (Int8Layer: two products, not three)
    products: str = "float32"

    def __post_init__(self) -> None:
        if self.n_dense < 0 or self.modalities < 0:
            raise ModelError(f"MLPConfig: n_dense={self.n_dense}, modalities={self.modalities}")
        if self.n_dense == 0 and self.modalities == 0:
            raise ModelError("MLPConfig: no inputs (n_dense=0 and modalities=0)")
        if self.hidden < 1 or self.blocks < 0 or self.depth < 1 or self.width < 1:
            raise ModelError(
                f"MLPConfig: hidden={self.hidden}, blocks={self.blocks}, depth={self.depth}, "
                f"width={self.width}: expected hidden, depth, width >= 1 and blocks >= 0"
            )
        if self.members < 1:
            raise ModelError(f"MLPConfig: members={self.members}: expected >= 1")
        if self.quantiles < 0 or self.quantiles == 1:
            raise ModelError(f"MLPConfig: quantiles={self.quantiles}: expected 0 (off) or >= 2")
        if self.bins < 0 or (self.bins and not 2 <= self.bins <= self.quantiles):
            raise ModelError(
                f"MLPConfig: bins={self.bins}: expected 0 (off) or 2..quantiles "
                f"({self.quantiles}): the bins' edges are quantiles' knots"
            )
        if any(not 0 <= c < self.n_dense for c in self.binned) or len(set(self.binned)) != len(
            self.binned
        ):
            raise ModelError(
                f"MLPConfig: binned={self.binned}: expected distinct dense columns "
                f"0..{self.n_dense - 1}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ModelError(f"MLPConfig: dropout={self.dropout} not in [0, 1)")
        if not self.heads:
            raise ModelError("MLPConfig: at least one head is needed")
        if self.products not in PRODUCTS:
            raise ModelError(
                f"MLPConfig: products={self.products!r}: expected one of {', '.join(PRODUCTS)}"
            )
        if self.dense_names and len(self.dense_names) != self.n_dense:
            raise ModelError(
                f"MLPConfig: {len(self.dense_names)} dense_names for n_dense={self.n_dense}"
            )

    @property
    def n_codes(self) -> int:
        """Rows of the sparse first layer, padding excluded: modalities × depth × width."""
        return self.modalities * self.depth * self.width

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (tuples become lists)."""
        d = asdict(self)
        d["heads"] = list(self.heads)
        d["dense_names"] = list(self.dense_names)
        d["binned"] = list(self.binned)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MLPConfig:
        """Inverse of :meth:`to_dict`; unknown keys are an error, not silently dropped."""
        known = set(cls.__dataclass_fields__)
        unknown = set(d) - known
        if unknown:
            raise ModelError(f"MLPConfig: unknown keys {sorted(unknown)}")
        d = dict(d)
        d["heads"] = tuple(d.get("heads", ("like",)))
        d["dense_names"] = tuple(d.get("dense_names", ()))
        d["binned"] = tuple(d.get("binned", ()))
        return cls(**d)


@dataclass(frozen=True)
class MLPInputs:
    """What the MLP reads for ``n`` events.

    ``dense``: ``(n, n_dense)`` float32, not yet standardized.
    ``codes``: ``(n, modalities, depth)`` int16/int32, the target item's bucket per depth, -1
    where the item is unknown to that modality's codebook.
    """

    dense: np.ndarray
    codes: np.ndarray

    def __len__(self) -> int:
        return int(self.dense.shape[0])

    def take(self, rows: np.ndarray | slice) -> MLPInputs:
        """The inputs of a subset of rows (index array, boolean mask or slice)."""
        return MLPInputs(dense=self.dense[rows], codes=self.codes[rows])


def _channel_pairs(names: Sequence[str]) -> tuple[list[tuple[str, str]], list[str]]:
    """From the ``mass/<channel>`` names: the (positive, negative) channel pairs, a positive
    channel ``*pos*`` with its ``*neg*`` (or ``*other*``) twin, and the channels in no pair
    (``top``, ``bottom``)."""
    chans = [n[len("mass/") :] for n in names if n.startswith("mass/")]
    pairs, paired = [], set()
    for c in chans:
        if "pos" not in c:
            continue
        for word in ("neg", "other"):
            twin = c.replace("pos", word)
            if twin in chans:
                pairs.append((c, twin))
                paired |= {c, twin}
                break
    return pairs, [c for c in chans if c not in paired]


def user_rate_columns(features: Any) -> tuple[np.ndarray, list[str]]:
    """The user's rates, read off the channel masses and densities: ``(n, k)`` float32 in
    [0, 1] and their names (none when ``features`` has no channel names).

    Per (positive, negative) channel pair (:func:`_channel_pairs`): the positive share of
    the pair's mass (the user's like rate, 0 for a user without events there), and the same
    share within the event item's buckets (density x mass: the like rate among the user's
    events near the item). Per unpaired channel (``top``, ``bottom``): its share of the
    first pair's mass (the user's value histogram). The MLP could in principle form these
    ratios from the log masses; given them, it needs far fewer examples to use them.
    """
    plan = _rate_plan(tuple(getattr(features, "names", ()) or ()))
    if plan is None:
        return np.zeros((len(features.valid), 0), np.float32), []
    pos_mass, neg_mass, pos_dens, neg_dens, single, names = plan
    density = np.asarray(features.density, dtype=np.float64)
    counts = np.asarray(features.counts, dtype=np.float64)
    n = density.shape[0]

    def share(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return np.where(b > 0, a / np.where(b > 0, b, 1.0), 0.0)

    pos, neg = np.maximum(counts[:, pos_mass], 0.0), np.maximum(counts[:, neg_mass], 0.0)
    near_pos, near_neg = density[:, pos_dens] * pos, density[:, neg_dens] * neg
    # per pair its rate then its rate near the item, pair by pair
    rates = np.empty((n, len(pos_mass), 2))  # np.stack(..., axis=2) without its overhead
    rates[:, :, 0] = share(pos, pos + neg)
    rates[:, :, 1] = share(near_pos, near_pos + near_neg)
    total = (pos[:, 0] + neg[:, 0])[:, None]
    shares = share(np.maximum(counts[:, single], 0.0), total)
    out = np.concatenate([rates.reshape(n, 2 * len(pos_mass)), shares], axis=1)
    return out.astype(np.float32), list(names)


@functools.lru_cache(maxsize=64)
def _rate_plan(names: tuple[str, ...]) -> tuple[Any, ...] | None:
    """For :func:`user_rate_columns`: the columns it reads for the feature ``names`` (the
    pairs' masses in ``counts``, their densities in ``density``, the unpaired channels'
    masses) and the names of what it returns; None without a channel pair."""
    pairs, single = _channel_pairs(names)
    if not pairs:
        return None
    col = {n: i for i, n in enumerate(names)}
    n_density = sum(1 for n in names if n.startswith("density/"))

    def mass(c: str) -> int:
        return col[f"mass/{c}"] - n_density

    out_names = [f"{kind}/{pos}" for pos, _ in pairs for kind in ("rate", "rate_near")]
    return (
        np.array([mass(p) for p, _ in pairs]),
        np.array([mass(q) for _, q in pairs]),
        np.array([col[f"density/{p}"] for p, _ in pairs]),
        np.array([col[f"density/{q}"] for _, q in pairs]),
        np.array([mass(c) for c in single], dtype=np.intp),
        tuple(out_names + [f"share/{c}" for c in single]),
    )


def assemble(
    features: Any, item_features: np.ndarray | None = None, *, user_rates: bool = False
) -> MLPInputs:
    """Build MLP inputs from the aggregator's ``Features`` (and optional item features).

    The one feature-assembly function: the trainer and the streaming worker both call it.

    ``features.density``: ``(n, C*M)`` shares of user sketch mass in the item's buckets.
    ``features.counts``: ``(n, k)`` non-negative counts, log1p-scaled here (heavy-tailed).
    ``user_rates``: then :func:`user_rate_columns` (``r`` columns).
    ``features.item_codes``: ``(n, M, D)`` int16 bucket codes, -1 unknown.
    ``features.cf``: ``(n, f)`` item-item CF columns (optional, None: absent).
    ``item_features``: ``(n, s)`` float32 item features of the snapshot (already scaled), or
    None.
    Returns :class:`MLPInputs` with ``dense (n, C*M + k [+ r] + f + s)`` float32.
    """
    density = np.asarray(features.density, dtype=np.float32)
    n = density.shape[0]
    parts = [density.reshape(n, -1)]
    counts = getattr(features, "counts", None)
    if counts is not None and np.size(counts):
        c = np.asarray(counts, dtype=np.float32).reshape(n, -1)
        parts.append(np.sign(c) * np.log1p(np.abs(c)))
    if user_rates:
        parts.append(user_rate_columns(features)[0].reshape(n, -1))
    cf = getattr(features, "cf", None)
    if cf is not None:  # item-item CF columns, already in [-1, 1]
        parts.append(np.asarray(cf, dtype=np.float32).reshape(n, -1))
    if item_features is not None:
        s = np.asarray(item_features, dtype=np.float32)
        if s.shape[0] != n:
            raise ModelError(f"assemble: item_features has {s.shape[0]} rows, features have {n}")
        parts.append(s.reshape(n, -1))
    dense = np.concatenate(parts, axis=1) if parts else np.zeros((n, 0), np.float32)
    dense = dense.astype(np.float32, copy=False)  # concatenated: a copy of its parts
    bad = ~np.isfinite(dense)  # as np.nan_to_num(nan=0, posinf=0, neginf=0), at a tenth the cost
    if bad.any():
        dense[bad] = 0.0
    codes = np.asarray(features.item_codes)
    if codes.ndim != 3 or codes.shape[0] != n:
        raise ModelError(f"assemble: item_codes shape {codes.shape}, expected ({n}, M, D)")
    return MLPInputs(dense=np.ascontiguousarray(dense), codes=codes)


def counts_columns(features: Any) -> tuple[int, ...]:
    """The dense columns :func:`assemble` fills from ``features.counts`` (right after the
    density block): what :attr:`MLPConfig.binned` lists in a trained model."""
    density = np.asarray(features.density)
    start = int(np.prod(density.shape[1:]))
    counts = getattr(features, "counts", None)
    if counts is None or not np.size(counts):
        return ()
    return tuple(range(start, start + int(np.prod(np.shape(counts)[1:]))))


def code_indices(codes: torch.Tensor, width: int) -> torch.Tensor:
    """Flatten ``(n, M, D)`` bucket codes to rows of the sparse layer: ``(n, M*D)`` int64.

    Row ``(m*D + d)*width + code`` for a known bucket, ``M*D*width`` (the padding row) for -1.
    """
    n, m, d = codes.shape
    c = codes.long()
    base = (torch.arange(m * d, device=codes.device).view(1, m, d)) * width
    pad = m * d * width
    return torch.where(c >= 0, base + c.clamp(min=0, max=width - 1), pad).view(n, m * d)


class _Block(nn.Module):
    """x + Dropout(LeakyReLU(LayerNorm(Linear(x)))): ``(n, hidden) -> (n, hidden)``."""

    def __init__(self, hidden: int, dropout: float, slope: float) -> None:
        super().__init__()
        self.fc = nn.Linear(hidden, hidden)
        self.norm = nn.LayerNorm(hidden)
        self.act = nn.LeakyReLU(slope)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop(self.act(self.norm(self.fc(x))))


class EngagementMLP(nn.Module):
    """Residual MLP: (dense features, item bucket codes) → one logit per head.

    With ``config.members`` K > 1 it is an ensemble: ``members`` holds K networks of the same
    shape (each ``members = 1``), the logit is their mean (:meth:`member_logits` gives each).
    """

    def __init__(self, config: MLPConfig) -> None:
        super().__init__()
        self.config = config
        # trees on the dense block blended with some heads' logits (models.boost; None: none),
        # fitted after the weights by the trainer, applied by predict, saved beside the weights
        self.boost: HeadBoost | None = None
        if config.members > 1:
            one = MLPConfig.from_dict({**config.to_dict(), "members": 1})
            self.members = nn.ModuleList(EngagementMLP(one) for _ in range(config.members))
            return
        self.members = None
        h = config.hidden
        # Standardization of the dense block, fitted on training rows (set_normalization).
        self.register_buffer("dense_mean", torch.zeros(config.n_dense))
        self.register_buffer("dense_std", torch.ones(config.n_dense))
        q = config.quantiles if config.n_dense else 0
        if q:
            # (n_dense, q + 1) knots: the training rows' quantiles 0, 1/q, ..., 1 per column
            self.register_buffer("dense_knots", torch.zeros(config.n_dense, q + 1))
        n_in = config.n_dense * (2 if q else 1)
        b = config.bins if config.binned else 0
        if b:
            cols = config.binned
            contiguous = list(cols) == list(range(cols[0], cols[0] + len(cols)))
            self._binned_slice = slice(cols[0], cols[0] + len(cols)) if contiguous else None
            self.register_buffer("binned_index", torch.tensor(cols), persistent=False)
            # each bin [lo, hi) reads (x - lo) * scale clipped to [0, 1] (scale 1 / (hi - lo)),
            # plus step (1 for a bin of no width) where x >= hi: derived from the knots, so
            # not saved, rebuilt when the knots are set or loaded
            for name in ("bin_lo", "bin_hi", "bin_scale", "bin_step"):
                self.register_buffer(name, torch.zeros(len(cols), b), persistent=False)
            self.register_load_state_dict_post_hook(lambda module, _keys: module._set_bins())
            n_in += len(cols) * b
        self.dense_in = nn.Linear(n_in, h) if config.n_dense else None
        if config.modalities:
            self.codes_in = nn.EmbeddingBag(
                config.n_codes + 1, h, mode="sum", padding_idx=config.n_codes
            )
            # Summing M*D rows: scale the init so the sum has about unit variance.
            nn.init.normal_(
                self.codes_in.weight, std=1.0 / math.sqrt(config.modalities * config.depth)
            )
            with torch.no_grad():
                self.codes_in.weight[config.n_codes].zero_()
        else:
            self.codes_in = None
        self.bias_in = nn.Parameter(torch.zeros(h))
        self.norm_in = nn.LayerNorm(h)
        self.act_in = nn.LeakyReLU(config.leaky_slope)
        self.blocks = nn.ModuleList(
            _Block(h, config.dropout, config.leaky_slope) for _ in range(config.blocks)
        )
        self.head = nn.Linear(h, len(config.heads))
        self._fixed: list[FixedProduct] | None = None  # the products' integer weights, once built
        if config.products != "float32":
            # each product's input scale per column (calibrate_products; 0: not calibrated)
            for i, layer in enumerate(self._product_layers()):
                self.register_buffer(f"fixed_scale_{i}", torch.zeros(layer.in_features))
            self.register_load_state_dict_post_hook(lambda module, _keys: module._forget_fixed())

    def set_normalization(self, dense: np.ndarray) -> None:
        """Fit the dense standardization on training rows ``(n, n_dense)``."""
        if self.members is not None:
            for member in self.members:
                member.set_normalization(dense)
            return
        x = np.asarray(dense, dtype=np.float64)
        if x.shape[1] != self.config.n_dense:
            raise ModelError(
                f"set_normalization: {x.shape[1]} columns, n_dense={self.config.n_dense}"
            )
        mean = x.mean(axis=0)
        std = x.std(axis=0)
        std = np.where(std > 1e-6, std, 1.0)
        self.dense_mean.copy_(torch.from_numpy(mean.astype(np.float32)))
        self.dense_std.copy_(torch.from_numpy(std.astype(np.float32)))
        q = self.config.quantiles
        if q and len(x):
            knots = np.quantile(x, np.linspace(0.0, 1.0, q + 1), axis=0).T  # (n_dense, q + 1)
            self.dense_knots.copy_(torch.from_numpy(np.ascontiguousarray(knots, np.float32)))
            self._set_bins()

    def _set_bins(self) -> None:
        """The bins' tables from the knots: knots 0, q/b, ..., q of each binned column."""
        cfg = self.config
        if self.members is not None or not (cfg.bins and cfg.binned):
            return
        at = torch.from_numpy(np.rint(np.linspace(0, cfg.quantiles, cfg.bins + 1)).astype(int))
        edges = self.dense_knots[self.binned_index][:, at]  # (F, bins + 1)
        lo, hi = edges[:, :-1], edges[:, 1:]
        gap = hi - lo
        self.bin_lo.copy_(lo)
        self.bin_hi.copy_(hi)
        self.bin_scale.copy_(torch.where(gap > 0, 1.0 / torch.where(gap > 0, gap, 1.0), 0.0))
        self.bin_step.copy_((gap <= 0).to(self.bin_step.dtype))

    def _dense_block(self, dense: torch.Tensor) -> torch.Tensor:
        """``(n, n_dense)`` → the first layer's dense input: standardized values, then (with
        ``quantiles``) each column's training CDF, ``(n, 2 * n_dense)`` scaled to unit variance,
        then (with ``bins``) the binned columns' encodings (:meth:`_binned_block`).

        The CDF is linear between knots; a value tied with several knots reads the highest
        (the CDF at that value), so a column's mass at 0 maps to one point, not a range."""
        z = (dense - self.dense_mean) / self.dense_std
        q = self.config.quantiles
        if not q:
            return z
        knots = self.dense_knots  # (F, q + 1)
        xt = dense.t().contiguous()  # (F, n)
        idx = torch.searchsorted(knots, xt, right=True).clamp(1, q)
        lo = knots.gather(1, idx - 1)
        hi = knots.gather(1, idx)
        gap = hi - lo
        frac = torch.where(gap > 0, (xt - lo) / torch.where(gap > 0, gap, 1.0), 0.0)
        cdf = (idx - 1 + frac.clamp(0.0, 1.0)) / q
        # a uniform variable has variance 1/12: centre and scale it like the standardized block
        parts = [z, (cdf.t() - 0.5) * math.sqrt(12.0)]
        if self.config.bins and self.config.binned:
            parts.append(self._binned_block(dense))
        return torch.cat(parts, dim=1)

    def _binned_block(self, dense: torch.Tensor) -> torch.Tensor:
        """The binned columns' piecewise-linear encodings ``(n, len(binned) * bins)``: per bin
        ``[lo, hi)`` of a column, ``(x - lo) / (hi - lo)`` clipped to [0, 1]; a bin of no
        width (tied quantiles) reads 1 from its edge on, a step. Left in [0, 1]: standardized
        (each encoding by its training deviation) they overfit the small data sets (seed 0,
        ml-100k like AUC 0.7815 -> 0.7773, instacart RCE 38.54 -> 30.85)."""
        cols = self._binned_slice
        x = (dense[:, cols] if cols is not None else dense[:, self.binned_index]).unsqueeze(2)
        frac = ((x - self.bin_lo) * self.bin_scale).clamp_(0.0, 1.0)  # (n, F, bins)
        return frac.add_((x >= self.bin_hi) * self.bin_step).flatten(1)

    def forward(self, dense: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """``dense (n, n_dense)`` float32, ``codes (n, M, D)`` int → logits ``(n, n_heads)``."""
        if self.members is not None:
            return self.member_logits(dense, codes).mean(dim=0)
        fixed = None if self.training else self._fixed_tables()
        layers = iter(fixed or ())
        x = self.bias_in
        if self.dense_in is not None:
            first = self._dense_block(dense)
            if fixed is None:
                x = x + self.dense_in(first)
            else:
                x = x + next(layers).reference(first) + self.dense_in.bias
        if self.codes_in is not None:
            x = x + self.codes_in(code_indices(codes, self.config.width))
        x = self.act_in(self.norm_in(x))
        for block in self.blocks:
            if fixed is None:
                x = block(x)
            else:  # eval: no dropout
                x = x + block.act(block.norm(next(layers).reference(x) + block.fc.bias))
        return self.head(x)

    def member_logits(self, dense: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """Each member's logits ``(members, n, n_heads)`` (``(1, n, n_heads)`` for one network):
        training fits every member to the labels on its own."""
        if self.members is None:
            return self(dense, codes).unsqueeze(0)
        return torch.stack([member(dense, codes) for member in self.members])

    def predict(self, inputs: MLPInputs, batch_size: int = 8192) -> np.ndarray:
        """Engagement probabilities ``(n, n_heads)`` float32, batched, no autograd.

        Runs the forward outside torch (:meth:`_logits_compiled`: compiled loops and BLAS
        products, a fraction of torch's fixed cost per call on small batches) unless
        :data:`~sketchstream.models.kernels.ENABLED` is off; then torch's own forward, the
        reference it is tested against (within 1e-6). With :attr:`boost`, its heads' logits
        are blended with their trees' before the sigmoid."""
        self._check(inputs)
        if kernels.ENABLED:
            out = np.empty((len(inputs), len(self.config.heads)), dtype=np.float32)
            for start in range(0, len(inputs), batch_size):
                stop = min(start + batch_size, len(inputs))
                part = inputs.take(slice(start, stop))
                logits = self._logits_compiled(part.dense, part.codes)
                if self.boost is not None:
                    self.boost.blend(part.dense, logits)
                out[start:stop] = expit(logits)
            return out
        was_training = self.training
        if was_training:  # toggling walks every submodule: a third of a ms a call, per batch
            self.eval()
        out = np.empty((len(inputs), len(self.config.heads)), dtype=np.float32)
        try:
            with torch.inference_mode():
                for start in range(0, len(inputs), batch_size):
                    stop = min(start + batch_size, len(inputs))
                    dense, codes = to_tensors(inputs.take(slice(start, stop)))
                    logits = self(dense, codes).numpy()
                    if self.boost is not None:
                        self.boost.blend(inputs.dense[start:stop], logits)
                    out[start:stop] = expit(logits)
        finally:
            if was_training:
                self.train()
        return out

    def warm_up(self) -> None:
        """Compile :meth:`predict`'s kernels (or load them from numba's disk cache) on one
        row, so that a worker pays it when a model loads, not in its first batch."""
        if kernels.ENABLED:
            cfg = self.config
            zeros = np.zeros((1, cfg.n_dense), np.float32)
            self.predict(MLPInputs(zeros, np.full((1, cfg.modalities, cfg.depth), -1, np.int16)))

    def _logits_compiled(
        self, dense: np.ndarray, codes: np.ndarray, peaks: list[np.ndarray] | None = None
    ) -> np.ndarray:
        """:meth:`forward` in eval mode (no dropout) without torch: ``(n, n_heads)`` float32
        logits from the numpy inputs. Reads the parameters in place (views, no copy), so it
        is never stale, in training too (a fixed-point model's integer weights are built
        once calibrated, after training). ``peaks``: one array per product, raised to each
        input column's largest magnitude (float32 products then, for calibrate_products)."""
        if self.members is not None:
            logits = [member._logits_compiled(dense, codes) for member in self.members]
            return np.mean(logits, axis=0, dtype=np.float32)
        cfg = self.config
        n = dense.shape[0]
        arr = _array
        fixed = None if peaks is not None else self._fixed_tables()
        layer = 0

        def product(inp: np.ndarray, linear: nn.Linear, out: np.ndarray) -> None:
            nonlocal layer
            if fixed is not None:
                fixed[layer].product(inp, out)
            else:
                if peaks is not None and len(inp):
                    np.maximum(peaks[layer], np.abs(inp).max(axis=0), out=peaks[layer])
                np.matmul(inp, arr(linear.weight).T, out=out)
            layer += 1

        x = np.empty((n, cfg.hidden), dtype=np.float32)
        if self.dense_in is not None:
            q = cfg.quantiles
            knots = arr(self.dense_knots) if q else np.zeros((cfg.n_dense, 1), np.float32)
            if cfg.bins and cfg.binned:
                binned = arr(self.binned_index)
                tables = [arr(t) for t in (self.bin_lo, self.bin_hi, self.bin_scale)]
                step = arr(self.bin_step)
            else:
                binned = np.zeros(0, np.int64)
                tables = [np.zeros((0, 1), np.float32)] * 3
                step = tables[0]
            first = np.empty((n, self.dense_in.in_features), dtype=np.float32)
            mlp_kernels.dense_inputs(
                np.ascontiguousarray(dense, dtype=np.float32),
                arr(self.dense_mean),
                arr(self.dense_std),
                knots,
                binned,
                *tables,
                step,
                first,
            )
            product(first, self.dense_in, x)
            x += arr(self.dense_in.bias)
            x += arr(self.bias_in)
        else:
            x[:] = arr(self.bias_in)
        if self.codes_in is not None:
            mlp_kernels.add_code_rows(
                np.ascontiguousarray(codes, dtype=np.int32), cfg.width, arr(self.codes_in.weight), x
            )
        self._norm_act(x, self.norm_in)
        y = np.empty_like(x)
        for block in self.blocks:
            product(x, block.fc, y)
            y += arr(block.fc.bias)
            self._norm_act(y, block.norm)
            x += y
        return x @ arr(self.head.weight).T + arr(self.head.bias)

    def calibrate_products(self, inputs: MLPInputs, batch_size: int = 8192) -> None:
        """Fix a ``"fixed16"`` or ``"int8"`` model's input scales on ``inputs`` (the training
        rows), after training: each product input column's scale is its largest magnitude on
        them, times :data:`FIXED_HEADROOM`, over 127. A column that is always 0 gets 1 with
        ``"fixed16"``, the smallest of the others' scales with ``"int8"`` (a weight row's one
        digit is shared by its columns at their scales: a large made-up one would leave the
        others a few levels). From then on :meth:`predict` (and the eval forward) compute the
        products in fixed point."""
        if self.config.products == "float32":
            raise ModelError(f"calibrate_products: products={self.config.products!r}")
        if self.members is not None:
            for member in self.members:
                member.calibrate_products(inputs, batch_size)
            return
        peaks = [np.zeros(layer.in_features, np.float32) for layer in self._product_layers()]
        for start in range(0, len(inputs), batch_size):
            part = inputs.take(slice(start, min(start + batch_size, len(inputs))))
            self._logits_compiled(
                np.ascontiguousarray(part.dense, dtype=np.float32), part.codes, peaks=peaks
            )
        for i, peak in enumerate(peaks):
            scale = fixed_scales(peak, self.config.products)
            getattr(self, f"fixed_scale_{i}").copy_(torch.from_numpy(scale))
        self._forget_fixed()

    @property
    def fixed_ready(self) -> bool:
        """False for a fixed-point model not calibrated yet (True for ``"float32"``)."""
        if self.members is not None:
            return all(member.fixed_ready for member in self.members)
        return self.config.products == "float32" or self._fixed_tables() is not None

    def _product_layers(self) -> list[nn.Linear]:
        """The linears whose products are in fixed point (not the head)."""
        first = [self.dense_in] if self.dense_in is not None else []
        return first + [block.fc for block in self.blocks]

    def _forget_fixed(self) -> None:
        self._fixed = None

    def _fixed_tables(self) -> list[FixedProduct] | None:
        """The fixed-point products (built from the weights and scales at first use); None:
        float32 products (``products="float32"``, or not calibrated yet: in training)."""
        if self.config.products == "float32":
            return None
        if self._fixed is None:
            linears = self._product_layers()
            self._fixed = fixed_layers(
                self.config.products,
                [_array(linear.weight) for linear in linears],
                [_array(getattr(self, f"fixed_scale_{i}")) for i in range(len(linears))],
            )
        return self._fixed

    def _norm_act(self, x: np.ndarray, norm: nn.LayerNorm) -> None:
        mlp_kernels.norm_act(
            x,
            _array(norm.weight),
            _array(norm.bias),
            float(norm.eps),
            float(self.config.leaky_slope),
        )

    def _check(self, inputs: MLPInputs) -> None:
        cfg = self.config
        if inputs.dense.ndim != 2 or inputs.dense.shape[1] != cfg.n_dense:
            raise ModelError(
                f"dense features of shape {inputs.dense.shape}: "
                f"the model expects (n, {cfg.n_dense})"
            )
        if cfg.modalities and inputs.codes.shape[1:] != (cfg.modalities, cfg.depth):
            raise ModelError(
                f"item codes of shape {inputs.codes.shape}: the model expects "
                f"(n, {cfg.modalities}, {cfg.depth})"
            )


@dataclass(frozen=True)
class FixedLayer:
    """One matrix product ``x @ W.T`` in 16-bit fixed point with exact integer sums.

    Each input column ``k`` is ``x_k ~ s_k (h_k + l_k / 256)``, two int8 digits at the
    column's calibrated scale ``s_k``; each weight row ``j`` of ``W_jk s_k`` (the scale folded
    in) is ``r_j (P1_jk + P2_jk / 256)``. The product is
    ``r_j (h.P1 + (h.P2 + l.P1) / 256)``: three int8 products summed exactly in int32
    (``torch._int_mm``, AMX/VNNI on x86), so a row's result does not depend on the rows it is
    batched with, on the machine's kernels or on threads. A float32 input moved in its last
    bit (as batching moves the decayed features) moves its low digit by one at most, 1/256 of
    a scale step: a worker's scores stay within 1e-5 of the offline replay's, as with float32
    products."""

    inv_scale: np.ndarray  # (k,) float32: 1 / s
    hi: torch.Tensor  # (k, 2m) int8: [P1 | P2] transposed
    lo: torch.Tensor  # (k, m) int8: P1 transposed
    scale: np.ndarray  # (m,) float64: r

    @classmethod
    def from_weights(cls, weight: np.ndarray, scale: np.ndarray) -> FixedLayer:
        """From a float32 ``weight (m, k)`` and the inputs' ``scale (k,)`` (all > 0)."""
        t, r = _weight_rows(weight, scale)
        p1 = np.rint(t)
        p2 = np.clip(np.rint((t - p1) * 256.0), -127, 127)
        hi = np.ascontiguousarray(np.concatenate([p1, p2]).T.astype(np.int8))
        lo = np.ascontiguousarray(p1.T.astype(np.int8))
        return cls(
            inv_scale=_inverse(scale),
            hi=torch.from_numpy(hi),
            lo=torch.from_numpy(lo),
            scale=r,
        )

    def product(self, x: np.ndarray, out: np.ndarray) -> None:
        """``out (n, m)`` float32 ``~ x @ W.T`` for ``x (n, k)`` float32 (compiled path), in
        chunks of :data:`FIXED_CHUNK` rows (each row's result is its own: the same bits)."""
        hi = np.empty((min(len(x), FIXED_CHUNK), x.shape[1]), np.int8)
        lo = np.empty_like(hi)
        for start in range(0, len(x), FIXED_CHUNK):
            stop = min(start + FIXED_CHUNK, len(x))
            h, low = hi[: stop - start], lo[: stop - start]
            mlp_kernels.quantize16(x[start:stop], self.inv_scale, h, low)
            mlp_kernels.dequantize16(
                _int_products(h, self.hi), _int_products(low, self.lo), self.scale, out[start:stop]
            )

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        """The same product in torch ops (the reference forward's): float64 sums of the
        digits' products, exact as the compiled path's int32 ones."""
        h, lo = _input_digits(x, self.inv_scale)
        m = self.lo.shape[1]
        p = self.hi.double()
        g_hi = h.double() @ p
        g = g_hi[:, :m] + (g_hi[:, m:] + lo.double() @ p[:, :m]) / 256.0
        return (torch.from_numpy(self.scale) * g).float()


@dataclass(frozen=True)
class Int8Layer:
    """One matrix product ``x @ W.T`` with int8 weights and 16-bit fixed-point inputs.

    The inputs are :class:`FixedLayer`'s two digits at each column's calibrated scale ``s_k``;
    each weight row ``j`` of ``W_jk s_k`` is one int8 digit at its own scale,
    ``r_j P_jk`` (rounded to 1/254 of the row's largest magnitude: the one approximation
    beyond the inputs' digits). The two digit rows go through one int8 product with ``P``,
    stacked ``[hi; lo] @ P``, summed exactly in int32: ``r_j (hi.P + lo.P / 256)``. A row's
    result depends on its own inputs only, not on its batch, threads or the CPU's kernels.

    Two int8 products where ``FixedLayer`` takes three, and one byte a weight read: where a
    product is bound by reading its weights (the recommender's first layer, ~10,000 x 1,024
    on ML-1M, at answer batches of tens of rows) a quarter of float32's reads."""

    inv_scale: np.ndarray  # (k,) float32: 1 / s
    weight: torch.Tensor  # (k, m) int8: P transposed
    scale: np.ndarray  # (m,) float64: r

    @classmethod
    def from_weights(cls, weight: np.ndarray, scale: np.ndarray) -> Int8Layer:
        """From a float32 ``weight (m, k)`` and the inputs' ``scale (k,)`` (all > 0)."""
        t, r = _weight_rows(weight, scale)
        p = np.ascontiguousarray(np.rint(t).T.astype(np.int8))
        return cls(
            inv_scale=_inverse(scale),
            weight=torch.from_numpy(p),
            scale=r,
        )

    def product(self, x: np.ndarray, out: np.ndarray) -> None:
        """``out (n, m)`` float32 ``~ x @ W.T`` for ``x (n, k)`` float32 (compiled path), in
        chunks of :data:`FIXED_CHUNK` rows (each row's result is its own: the same bits)."""
        digits = np.empty((2 * min(len(x), FIXED_CHUNK), x.shape[1]), np.int8)
        for start in range(0, len(x), FIXED_CHUNK):
            stop = min(start + FIXED_CHUNK, len(x))
            c = stop - start
            mlp_kernels.quantize16(x[start:stop], self.inv_scale, digits[:c], digits[c : 2 * c])
            g = _int_products(digits[: 2 * c], self.weight)
            mlp_kernels.dequantize8(g[:c], g[c:], self.scale, out[start:stop])

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        """The same product in torch ops: float64 sums of the digits' products (exact)."""
        h, lo = _input_digits(x, self.inv_scale)
        p = self.weight.double()
        g = h.double() @ p + (lo.double() @ p) / 256.0
        return (torch.from_numpy(self.scale) * g).float()


def _weight_rows(weight: np.ndarray, scale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``weight (m, k)`` with the inputs' ``scale (k,)`` folded in, each row in units of its
    own scale ``r`` (its largest magnitude / 127, 1 for a zero row): ``(rows, r)`` float64."""
    w = weight.astype(np.float64) * scale.astype(np.float64)[None, :]
    r = np.abs(w).max(axis=1) / 127.0
    r[r == 0] = 1.0
    return w / r[:, None], r


def _inverse(scale: np.ndarray) -> np.ndarray:
    return (1.0 / scale.astype(np.float64)).astype(np.float32)


def _input_digits(x: torch.Tensor, inv_scale: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """The inputs' two digits in torch ops, as :func:`~.mlp_kernels.quantize16` makes them."""
    t = (x * torch.from_numpy(inv_scale)).clamp(-127.0, 127.0)
    h = torch.round(t)
    return h, torch.round((t - h) * 256.0).clamp(max=127.0)


#: A ``"fixed16"`` or ``"int8"`` model's fixed-point product of one layer
FixedProduct = FixedLayer | Int8Layer


def fixed_scales(peak: np.ndarray, products: str) -> np.ndarray:
    """A product's calibrated input scales, float32, from each input column's largest
    magnitude on the training rows ``peak``: that times :data:`FIXED_HEADROOM`, over 127
    (beyond it a value clips). A column that is always 0 gets 1 with ``"fixed16"``, the
    smallest of the others' scales with ``"int8"``: a weight row's one digit is shared by its
    columns at their scales, so a large made-up one would leave the row's other weights a few
    levels (on a 32-wide model, 6 % error in its first layer)."""
    top = np.asarray(peak, np.float64) * FIXED_HEADROOM / 127.0
    unseen = 1.0
    if products == "int8" and (top > 0).any():
        unseen = top[top > 0].min()
    return np.where(top > 0, top, unseen).astype(np.float32)


def fixed_layers(
    products: str, weights: Sequence[np.ndarray], scales: Sequence[np.ndarray]
) -> list[FixedProduct] | None:
    """The fixed-point products (``"fixed16"`` or ``"int8"``) of float32 ``weights (m, k)``
    at their inputs' ``scales (k,)``; None while a scale is unset (0: not calibrated)."""
    if not all((scale > 0).all() for scale in scales):
        return None
    kind = FixedLayer if products == "fixed16" else Int8Layer
    return [kind.from_weights(w, scale) for w, scale in zip(weights, scales, strict=True)]


def _int_products(a: np.ndarray, b: torch.Tensor) -> np.ndarray:
    """``a (n, k) @ b (k, m)``, int8 digits, summed exactly: int32 ``(n, m)``. torch's int8
    product where it is exact on this CPU (:func:`int8_products_exact`), else BLAS on the
    digits as floats (exact too: float32 while ``k * 127 * 128 < 2**24``, else float64)."""
    if int8_products_exact():
        return torch._int_mm(torch.from_numpy(a), b).numpy()
    dtype = np.float32 if a.shape[1] * 127 * 128 < 2**24 else np.float64
    return (a.astype(dtype) @ b.numpy().astype(dtype)).astype(np.int32)


@functools.cache
def int8_products_exact() -> bool:
    """Whether ``torch._int_mm`` sums int8 products exactly on this CPU: on AVX2 without VNNI
    the int8 kernels pair products in saturating int16 (or halve the weights), which the
    fixed-point digits' full range would hit. Checked once per process on the extremes."""
    rng = np.random.default_rng(0)
    digits = np.array([-128, -127, 127], dtype=np.int8)
    a = rng.choice(digits, size=(24, 1024))
    b = rng.choice(digits[1:], size=(1024, 40))
    a[0], a[1], b[:, 0], b[:, 1] = 127, -128, 127, -127  # every pair at the extreme
    try:
        got = torch._int_mm(torch.from_numpy(a), torch.from_numpy(b)).numpy()
    except (RuntimeError, AttributeError) as exc:
        log.warning("torch's int8 product is not available (%s): fixed16 products on BLAS", exc)
        return False
    exact = np.array_equal(got, a.astype(np.int64) @ b.astype(np.int64))
    if not exact:
        log.warning("torch's int8 product is not exact on this CPU: fixed16 products on BLAS")
    return exact


def _array(t: torch.Tensor) -> np.ndarray:
    """A parameter or buffer as a numpy view of its memory (no copy: never stale)."""
    return t.detach().numpy()


def set_threads(n: int) -> None:
    """Run the MLP on ``n`` threads: torch's pool (training, the reference forward) and the
    BLAS pools that :meth:`EngagementMLP.predict`'s products use, for the whole process."""
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(n)
    threadpool_limits(limits=n, user_api="blas")


def to_tensors(inputs: MLPInputs) -> tuple[torch.Tensor, torch.Tensor]:
    """``MLPInputs`` → (dense float32, codes int64) tensors sharing memory where possible."""
    dense = torch.from_numpy(np.ascontiguousarray(inputs.dense, dtype=np.float32))
    codes = torch.from_numpy(np.ascontiguousarray(inputs.codes).astype(np.int64, copy=False))
    return dense, codes
