"""The catalogue a recommendation ranks, and its top-k: every item scored by the sum of its
buckets' log-probabilities (the EMDE decoding), the best k per request found without sorting
or holding ``(requests, n_items)`` scores.

    catalogue = Catalogue.from_codebooks(codebooks, ["interactions", "metadata"], items)
    scores = catalogue.scores(log_probs)                    # (B, n_items), offline ranking
    ids, best = catalogue.top_k(log_probs, k=10, exclude=seen)   # the worker's answers

Both read the same decoding (one torch ``embedding_bag`` gather-and-sum per item, in level
order, float32), so an answer's scores are those of offline ranking to the bit; top-k gives
the items of a stable sort of every score, ties to the lower catalogue row.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from sketchstream.models.errors import ModelError

__all__ = ["Catalogue"]

# Requests decoded at once: embedding_bag gathers a row of this many floats per item and
# level, for ~2.5x the time of a row of one (one thread, 100k items x 24 levels: 2.0 ms for
# one request, 5.2 ms for 32). top_k per request there: 16 columns 600 us, 24 486, 32 451,
# 48 442 (a loaded machine: the trend, not the figures); the (n_items, 32) scores stay small.
_DECODE_COLUMNS = 32
# Sorting a candidate row costs about this many sample cells partitioned (see _best).
_SORT_COST = 10
# Catalogue rows scored at once in top_k: (16,384, 32) float32 scores, 2 MB, stay in the cache
# (one thread, 1M items x 24 levels, decode and threshold for 32 requests: 157 ms in one block,
# 68 ms in blocks of 16k, 127 ms in blocks of 256k).
_ITEM_BLOCK = 1 << 14


class Catalogue:
    """The items a recommendation ranks and their buckets: ``ids (n_items,)``, ``levels
    (n_items, L)`` int64 rows ``level * width + bucket`` into a flattened ``(L, width)``
    output, and optional ``categories`` per item (for the candidate filter).

    Decoding is one gather-and-sum per item (torch's ``embedding_bag`` on the flattened
    levels: an item's level log-probabilities added in level order, in float32), for
    ``_DECODE_COLUMNS`` requests at a time. :meth:`scores` and :meth:`top_k` share it, so
    offline ranking and the worker's answers read the very same numbers."""

    def __init__(
        self,
        ids: Sequence[str],
        levels: np.ndarray,
        width: int,
        categories: Sequence[frozenset[str]] | None = None,
    ) -> None:
        self.ids = tuple(str(i) for i in ids)
        self.levels = np.asarray(levels, np.int64)
        self.width = int(width)
        if self.levels.shape[0] != len(self.ids) or self.levels.ndim != 2:
            raise ModelError(f"Catalogue: levels {self.levels.shape} for {len(self.ids)} ids")
        self.categories = None if categories is None else tuple(categories)
        n, n_levels = self.levels.shape
        self._n_out = n_levels * self.width
        # int32 indices: the gather is bound by reading them, int64 would be twice the bytes
        self._flat = torch.from_numpy(self.levels.reshape(-1).astype(np.int32))
        self._offsets = torch.arange(0, n * n_levels, n_levels, dtype=torch.int32)

    @classmethod
    def from_codebooks(
        cls,
        codebooks: Mapping[str, Any],
        modalities: Sequence[str],
        items: Sequence[Any] | None = None,
    ) -> Catalogue:
        """Items known to every codebook in ``modalities``, in the first one's order; levels
        run modality after modality. ``items``: :class:`~.events.Item` records whose
        ``categories`` feed the candidate filter."""
        first = codebooks[modalities[0]]
        ids = list(first.ids_)
        codes = np.concatenate([codebooks[m].encode(ids) for m in modalities], axis=1)
        ok = (codes >= 0).all(axis=1)
        ids = [i for i, good in zip(ids, ok, strict=True) if good]
        codes = codes[ok].astype(np.int64)
        width = first.width
        levels = codes + np.arange(codes.shape[1])[None, :] * width
        cats = None
        if items is not None:
            by_id = {it.item: frozenset(it.categories) for it in items}
            cats = [by_id.get(i, frozenset()) for i in ids]
        return cls(ids, levels, width, cats)

    def __len__(self) -> int:
        return len(self.ids)

    def scores(self, log_probs: np.ndarray) -> np.ndarray:
        """``(B, n_items)`` float32: sum of each item's level log-probabilities, from
        ``log_probs (B, L * width)``."""
        lp = self._checked(log_probs, "scores")
        out = np.empty((len(lp), len(self.ids)), np.float32)
        for a in range(0, len(lp), _DECODE_COLUMNS):
            part = lp[a : a + _DECODE_COLUMNS]
            out[a : a + _DECODE_COLUMNS] = self._decode(self._table(part))[:, : len(part)].T
        return out

    def candidates(self, categories: Sequence[str]) -> np.ndarray:
        """``(n_items,)`` bool: items with any of ``categories``."""
        if self.categories is None:
            raise ModelError("candidate filter: the catalogue has no item categories")
        want = frozenset(categories)
        return np.fromiter((bool(c & want) for c in self.categories), bool, len(self.ids))

    def top_k(
        self,
        log_probs: np.ndarray,
        k: int = 10,
        *,
        exclude: Any = None,
        candidates: np.ndarray | None = None,
    ) -> tuple[list[list[str]], np.ndarray]:
        """Best ``k`` items per row of ``log_probs (B, L * width)``: ``(ids, scores (B, k'))``,
        float32, best first, ``k' <= k`` when fewer items remain (shorter rows padded with
        -inf). ``exclude (B, n_items)`` bool, a numpy array or a scipy sparse matrix (a
        user's seen items are few): items left out per row; ``candidates (n_items,)`` bool:
        the only items allowed. Ties go to the lower catalogue row.

        The items and scores of a stable sort of each row of :meth:`scores`, found without
        sorting, copying or even holding ``(B, n_items)`` scores (:meth:`_top_columns`)."""
        if k < 1:
            raise ModelError(f"top_k: k must be >= 1, got {k}")
        lp = self._checked(log_probs, "top_k")
        if exclude is not None and exclude.shape != (len(lp), len(self.ids)):
            raise ModelError(
                f"top_k: exclude has shape {exclude.shape}, expected {(len(lp), len(self.ids))}"
            )
        blocked = None if candidates is None else ~np.asarray(candidates, bool)
        # the excluded cells, by request: set to -inf in place, no (B, n_items) mask
        request, item = (np.zeros(0, np.int64),) * 2 if exclude is None else exclude.nonzero()
        order = np.argsort(request, kind="stable")
        request, item = request[order], item[order]
        best: list[tuple[np.ndarray, np.ndarray]] = []
        for a in range(0, len(lp), _DECODE_COLUMNS):
            lo, hi = np.searchsorted(request, [a, a + _DECODE_COLUMNS])
            excluded = (request[lo:hi] - a, item[lo:hi])
            best += self._top_columns(lp[a : a + _DECODE_COLUMNS], k, excluded, blocked)
        width = max((len(rows) for rows, _ in best), default=0)
        scores = np.full((len(lp), width), -np.inf, np.float32)
        for b, (_, got) in enumerate(best):
            scores[b, : len(got)] = got
        return [[self.ids[r] for r in rows] for rows, _ in best], scores

    def _top_columns(
        self,
        lp: np.ndarray,
        k: int,
        excluded: tuple[np.ndarray, np.ndarray],
        blocked: np.ndarray | None,
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        """:meth:`top_k` of ``lp (b, L * width)``, ``b <=`` ``_DECODE_COLUMNS``, ``excluded``
        its ``(request, item)`` cells: per request ``(rows, scores)``. The catalogue goes by
        blocks of ``_ITEM_BLOCK`` items, whose scores stay in the cache; the best ``k`` so far
        are kept between blocks, and the k-th of them is a floor for the next block's
        candidates (see :func:`_best`)."""
        b, n = len(lp), len(self.ids)
        table = self._table(lp)
        kept = _Kept.empty(b)
        request, item = excluded
        for start in range(0, n, _ITEM_BLOCK):
            stop = min(start + _ITEM_BLOCK, n)
            s = self._decode(table, start, stop)[:, :b]
            inside = (item >= start) & (item < stop)
            s[item[inside] - start, request[inside]] = -np.inf
            if blocked is not None:
                s[blocked[start:stop]] = -np.inf
            kept = kept.merge(_best(s, k, kept.floor(k)), start, k)
        return kept.split()

    def _checked(self, log_probs: np.ndarray, caller: str) -> np.ndarray:
        lp = np.asarray(log_probs, np.float32)
        if lp.ndim != 2 or lp.shape[1] != self._n_out:
            raise ModelError(
                f"Catalogue.{caller}: log_probs {lp.shape}, expected (B, {self._n_out})"
            )
        return lp

    def _table(self, lp: np.ndarray) -> torch.Tensor:
        """``lp (b, L * width)`` as the ``(L * width, b')`` table :meth:`_decode` gathers
        from, ``b'`` = ``b`` padded to whole 8-float vectors, in a tensor of plain strides (the
        numpy transpose of one row has strides that send embedding_bag down a ~50x slower
        path)."""
        table = torch.zeros((self._n_out, -(-len(lp) // 8) * 8))
        table[:, : len(lp)] = torch.from_numpy(lp.T)
        return table

    def _decode(self, table: torch.Tensor, start: int = 0, stop: int | None = None) -> np.ndarray:
        """``(stop - start, b')`` float32 scores of catalogue rows ``start:stop`` (default:
        all) for the requests of a :meth:`_table`: a fresh array, the caller may write in it."""
        stop = len(self.ids) if stop is None else stop
        n_levels = self.levels.shape[1]
        flat = self._flat[start * n_levels : stop * n_levels]
        out = torch.nn.functional.embedding_bag(
            flat, table, self._offsets[: stop - start], mode="sum"
        )
        return out.numpy()


def _best(s: np.ndarray, k: int, floor: np.ndarray) -> tuple[np.ndarray, ...]:
    """The candidates for each column's ``k`` best finite rows of ``s (n, b)``: ``(row,
    column, score)`` arrays, every row of the top k and every row tied with the k-th among
    them, none below ``floor (b,)`` (a score k rows reach elsewhere).

    Only rows at or above a per-column threshold are taken: ``floor``, or while a column has
    none, the k-th best of a strided sample of rows. The k sampled rows at or above it make
    the column's k-th best score reach it too, so the answer is exact, ties included. The
    sample's step balances its partition (n / step cells) against the rows sorted later
    (about k * step)."""
    n, b = s.shape
    kk = min(k, n)
    threshold = floor
    if not np.isfinite(floor).all():  # the blocks before set no floor, as a rule higher
        step = max(1, round(math.sqrt(n / (_SORT_COST * kk))))
        sample = s[::step]
        sample = np.where(np.isnan(sample), -np.inf, sample)  # NaN: never a candidate
        threshold = np.maximum(np.partition(sample, len(sample) - kk, axis=0)[-kk], floor)
    # the rows above some column's threshold, 8 columns a 64-bit word: ~30x faster than
    # .any(axis=1) or np.nonzero over all (n, b) cells
    above = np.zeros((n, -(-b // 8) * 8), bool)
    np.greater_equal(s, threshold, out=above[:, :b])
    words = above.view(np.uint64)
    hit = words[:, 0]
    for j in range(1, words.shape[1]):
        hit = hit | words[:, j]
    rows = np.flatnonzero(hit)
    at, col = np.nonzero(above[rows, :b])
    row = rows[at]
    val = s[row, col]
    finite = np.isfinite(val)  # -inf: excluded, or not a candidate
    return row[finite], col[finite], val[finite]


@dataclass(frozen=True)
class _Kept:
    """The best rows so far of ``b`` columns: ``row``, ``col``, ``val`` sorted by column,
    then score (best first), then row; at most k per column."""

    row: np.ndarray
    col: np.ndarray
    val: np.ndarray
    b: int

    @classmethod
    def empty(cls, b: int) -> _Kept:
        return cls(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32), b)

    def _starts(self) -> np.ndarray:
        return np.searchsorted(self.col, np.arange(self.b + 1))

    def floor(self, k: int) -> np.ndarray:
        """``(b,)`` the k-th kept score of each column, -inf where fewer are kept."""
        starts = self._starts()
        out = np.full(self.b, -np.inf, np.float32)
        full = np.diff(starts) >= k
        out[full] = self.val[starts[:-1][full] + k - 1]
        return out

    def merge(self, found: tuple[np.ndarray, ...], offset: int, k: int) -> _Kept:
        """The best k per column of these and ``found`` (rows counted from ``offset``); a
        row found later loses a tie to a kept one: it comes later in the catalogue."""
        row, col, val = found
        row = np.concatenate([self.row, row + offset])
        col = np.concatenate([self.col, col])
        val = np.concatenate([self.val, val])
        order = np.lexsort((row, -val, col))
        row, col, val = row[order], col[order], val[order]
        starts = np.searchsorted(col, np.arange(self.b + 1))
        keep = np.arange(len(col)) - starts[col] < k
        return _Kept(row[keep], col[keep], val[keep], self.b)

    def split(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per column ``(rows, scores)``, best first."""
        return [(self.row[lo:hi], self.val[lo:hi]) for lo, hi in itertools.pairwise(self._starts())]
