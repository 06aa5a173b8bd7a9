"""Compiled (numba) steps of the engagement MLP's inference: what
:meth:`~sketchstream.models.mlp.EngagementMLP.predict` runs around the matrix products.

The torch forward of a hidden-256 model is about forty tensor calls (the dense block's
standardization, quantile CDF and bins; the code rows; three LayerNorm + LeakyReLU; the
residual adds), each with a fixed cost of several µs: on a worker's small batches (50 events)
that overhead is most of the MLP's time. Here each of those steps is one loop, and the three
matrix products go to numpy's BLAS (the same single-thread speed as torch's on this machine),
or, for a ``products="fixed16"`` model, to exact int8 products (``FixedLayer``):

- :func:`dense_inputs`: the first layer's dense input, ``EngagementMLP._dense_block``;
- :func:`add_code_rows`: the sparse first layer (``nn.EmbeddingBag(mode="sum")`` over
  :func:`~sketchstream.models.mlp.code_indices`);
- :func:`norm_act`: ``LeakyReLU(LayerNorm(x))`` in place;
- :func:`quantize16`, :func:`dequantize16`: around the fixed-point products of a model
  whose ``MLPConfig.products`` is ``"fixed16"`` (see ``EngagementMLP.calibrate_products``);
  :func:`dequantize8` after the recommender's ``"int8"`` products (``Int8Layer``);
- :func:`tree_scores`: the raw score of a boosted head's trees (``models.boost.Trees``),
  LightGBM's own to the bit.

Same arithmetic as the torch forward, in float32 where it is float32 (the products and
sums' order differ, so probabilities agree within 1e-6, not to the bit:
tests/models/test_mlp.py). :data:`~sketchstream.models.kernels.ENABLED` is the switch, as for
the aggregator's kernels: with ``SKETCHSTREAM_NO_JIT=1`` ``predict`` runs the torch forward.
"""

from __future__ import annotations

import numpy as np
from sketchstream.models.kernels import compiled

__all__ = [
    "add_code_rows",
    "dense_inputs",
    "dequantize8",
    "dequantize16",
    "norm_act",
    "quantize16",
    "tree_scores",
]


@compiled
def dense_inputs(
    dense: np.ndarray,
    mean: np.ndarray,
    std: np.ndarray,
    knots: np.ndarray,
    binned: np.ndarray,
    bin_lo: np.ndarray,
    bin_hi: np.ndarray,
    bin_scale: np.ndarray,
    bin_step: np.ndarray,
    out: np.ndarray,
) -> None:
    """``out (n, n_in)`` float32: per row of ``dense (n, F)`` the standardized values
    ``(x - mean) / std``; then, when ``knots (F, q + 1)`` has ``q >= 1``, each column's CDF
    between its knots (the highest knot tied with x wins: right-sided search), centred and
    scaled by sqrt(12); then per column ``binned[j]`` its ``bins`` encodings
    ``clip((x - lo) * scale, 0, 1) + step * (x >= hi)`` from the ``(len(binned), bins)``
    tables. ``n_in = F`` (no knots), ``2F``, or ``2F + len(binned) * bins``."""
    n, f = dense.shape
    q = knots.shape[1] - 1
    nb = bin_lo.shape[1]
    root12 = np.float32(np.sqrt(12.0))
    half = np.float32(0.5)
    one = np.float32(1.0)
    zero = np.float32(0.0)
    # column by column, each step of the knots' search over all rows at once: the rows'
    # searches are independent, so the step loop vectorizes (a row at a time, each step waited
    # for the load before it: 1.6 µs a row on the default model, 0.6 this way; the same bits)
    xs = np.empty(n, dtype=np.float32)
    at = np.empty(n, dtype=np.int64)
    for c in range(f):
        row = knots[c]
        for r in range(n):
            x = dense[r, c]
            xs[r] = x
            out[r, c] = (x - mean[c]) / std[c]
            at[r] = 0
        if q < 1:
            continue
        # the first knot > x (right-sided search, branch-free), clamped to 1..q
        length = q + 1
        while length > 1:
            step = length // 2
            for r in range(n):
                a = at[r]
                at[r] = a + step if row[a + step] <= xs[r] else a
            length -= step
        for r in range(n):
            x = xs[r]
            a = at[r]
            idx = min(max(a + (1 if row[a] <= x else 0), 1), q)
            lo = row[idx - 1]
            gap = row[idx] - lo
            frac = (x - lo) / gap if gap > zero else zero
            frac = min(max(frac, zero), one)
            cdf = (np.float32(idx - 1) + frac) / np.float32(q)
            out[r, f + c] = (cdf - half) * root12
    base = 2 * f
    for r in range(n):
        for j in range(binned.shape[0]):
            x = dense[r, binned[j]]
            for k in range(nb):
                v = min(max((x - bin_lo[j, k]) * bin_scale[j, k], zero), one)
                if x >= bin_hi[j, k]:
                    v += bin_step[j, k]
                out[r, base + j * nb + k] = v


@compiled
def add_code_rows(codes: np.ndarray, width: int, weight: np.ndarray, out: np.ndarray) -> None:
    """``out (n, h) += `` the sum of ``weight``'s row ``(m * D + d) * width + code`` over
    each row's known codes ``codes (n, M, D)`` (a code above ``width - 1`` reads row
    ``width - 1``; -1, unknown, reads the zero padding row: nothing)."""
    n, m_count, d_count = codes.shape
    h = out.shape[1]
    for r in range(n):
        for m in range(m_count):
            for d in range(d_count):
                code = codes[r, m, d]
                if code < 0:
                    continue
                row = (m * d_count + d) * width + min(code, width - 1)
                for j in range(h):
                    out[r, j] += weight[row, j]


@compiled(fastmath=True)
def norm_act(x: np.ndarray, gain: np.ndarray, bias: np.ndarray, eps: float, slope: float) -> None:
    """``x (n, h)`` float32 in place: ``LeakyReLU(slope)(LayerNorm(x))`` per row, LayerNorm's
    biased variance and ``eps`` as torch's."""
    n, h = x.shape
    for r in range(n):
        s = 0.0
        for j in range(h):
            s += x[r, j]
        mu = s / h
        v = 0.0
        for j in range(h):
            dv = x[r, j] - mu
            v += dv * dv
        inv = 1.0 / np.sqrt(v / h + eps)
        for j in range(h):
            y = (x[r, j] - mu) * inv * gain[j] + bias[j]
            x[r, j] = y if y > 0.0 else slope * y


#: 1.5 * 2**23: ``(t + ROUND) - ROUND`` rounds a float32 ``|t| < 2**22`` to the nearest
#: integer, ties to even (as ``np.rint`` and ``torch.round``), in two additions that vectorize
ROUND = np.float32(12582912.0)


@compiled
def quantize16(x: np.ndarray, inv_scale: np.ndarray, hi: np.ndarray, lo: np.ndarray) -> None:
    """``x (n, k)`` float32 as two int8 digits per value: ``t = x * inv_scale`` clipped to
    [-127, 127], ``hi = round(t)``, ``lo = round((t - hi) * 256)`` clipped above at 127
    (its range -128..127), so ``x ~ (hi + lo / 256) / inv_scale`` to 1/512 of a scale step.
    ``hi, lo (n, k)`` int8, written (two arrays, not one: writes to two places of one array
    do not vectorize)."""
    n, k = x.shape
    top = np.float32(127.0)
    bottom = np.float32(-127.0)
    digit = np.float32(256.0)
    for r in range(n):
        row, a, b = x[r], hi[r], lo[r]
        for j in range(k):
            t = row[j] * inv_scale[j]
            t = t if t > bottom else bottom
            t = t if t < top else top
            h = (t + ROUND) - ROUND
            m = ((t - h) * digit + ROUND) - ROUND
            m = m if m < top else top
            a[j] = np.int32(h)
            b[j] = np.int32(m)


@compiled
def dequantize16(g_hi: np.ndarray, g_lo: np.ndarray, scale: np.ndarray, out: np.ndarray) -> None:
    """``out (n, m)`` float32, written: ``scale * (G11 + (G12 + G21) / 256)`` per column, from
    the exact integer products ``g_hi = hi @ [P1 | P2]`` ``(n, 2m)`` and ``g_lo = lo @ P1``
    ``(n, m)`` int32 (``P1, P2`` the weights' two digits), in float64 (exact for int32 sums),
    rounded once to float32. The ``lo * P2 / 65536`` term is left out (below the digits'
    own precision)."""
    n, m = out.shape
    for r in range(n):
        a, b, o = g_hi[r], g_lo[r], out[r]
        for j in range(m):
            o[j] = np.float32(scale[j] * (np.float64(a[j]) + np.float64(a[m + j] + b[j]) / 256.0))


@compiled
def dequantize8(g_hi: np.ndarray, g_lo: np.ndarray, scale: np.ndarray, out: np.ndarray) -> None:
    """``out (n, m)`` float32, written: ``scale * (G_hi + G_lo / 256)`` per column, from the
    exact integer products of the inputs' two digits with the one-digit weights, ``g_hi = hi @
    P`` and ``g_lo = lo @ P`` ``(n, m)`` int32, in float64 (exact), rounded once to float32."""
    n, m = out.shape
    for r in range(n):
        a, b, o = g_hi[r], g_lo[r], out[r]
        for j in range(m):
            o[j] = np.float32(scale[j] * (np.float64(a[j]) + np.float64(b[j]) / 256.0))


@compiled
def tree_scores(
    x: np.ndarray,
    feature: np.ndarray,
    threshold: np.ndarray,
    left: np.ndarray,
    right: np.ndarray,
    leaf_value: np.ndarray,
    roots: np.ndarray,
    out: np.ndarray,
) -> None:
    """``out (n,)`` float64, written: the sum over the trees of ``roots`` (in order) of the
    leaf each row ``x (n, F)`` reaches. From a node, a row goes left when its ``feature`` value
    (float64; NaN read as 0) is ``<= threshold``, else right; a child ``c < 0`` is leaf ``~c``.
    Tree by tree, all rows through one tree while its nodes are in cache."""
    out[:] = 0.0
    for root in roots:
        for i in range(x.shape[0]):
            node = root
            while node >= 0:
                v = np.float64(x[i, feature[node]])
                if np.isnan(v):
                    v = 0.0
                node = left[node] if v <= threshold[node] else right[node]
            out[i] += leaf_value[~node]
