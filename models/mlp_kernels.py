"""Compiled (numba) steps of the engagement MLP's inference: what
:meth:`~sketchstream.models.mlp.EngagementMLP.predict` runs around the matrix products.

The torch forward of a hidden-256 model is about forty tensor calls (the dense block's
standardization, quantile CDF and bins; the code rows; three LayerNorm + LeakyReLU; the
residual adds), each with a fixed cost of several µs: on a worker's small batches (50 events)
that overhead is most of the MLP's time. Here each of those steps is one loop, and the three
matrix products go to numpy's BLAS (the same single-thread speed as torch's on this machine):

- :func:`dense_inputs`: the first layer's dense input, ``EngagementMLP._dense_block``;
- :func:`add_code_rows`: the sparse first layer (``nn.EmbeddingBag(mode="sum")`` over
  :func:`~sketchstream.models.mlp.code_indices`);
- :func:`norm_act`: ``LeakyReLU(LayerNorm(x))`` in place.

Same arithmetic as the torch forward, in float32 where it is float32 (the products and
sums' order differ, so probabilities agree within 1e-6, not to the bit:
tests/models/test_mlp.py). :data:`~sketchstream.models.kernels.ENABLED` is the switch, as for
the aggregator's kernels: with ``SKETCHSTREAM_NO_JIT=1`` ``predict`` runs the torch forward.
"""

from __future__ import annotations

import numpy as np
from sketchstream.models.kernels import compiled

__all__ = ["add_code_rows", "dense_inputs", "norm_act"]


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
    for r in range(n):
        for c in range(f):
            x = dense[r, c]
            out[r, c] = (x - mean[c]) / std[c]
            if q < 1:
                continue
            # the first knot > x (right-sided search, branch-free), clamped to 1..q
            at, length = 0, q + 1
            while length > 1:
                step = length // 2
                at = at + step if knots[c, at + step] <= x else at
                length -= step
            idx = min(max(at + (1 if knots[c, at] <= x else 0), 1), q)
            lo = knots[c, idx - 1]
            gap = knots[c, idx] - lo
            frac = (x - lo) / gap if gap > zero else zero
            frac = min(max(frac, zero), one)
            cdf = (np.float32(idx - 1) + frac) / np.float32(q)
            out[r, f + c] = (cdf - half) * root12
        base = 2 * f
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
