"""Item-item similarity for the CF feature: cosine of items' like vectors over users, top-K.

Part of the item snapshot (:class:`~sketchstream.models.snapshot.ItemSnapshot.similarity`):
built by the refresh job (offline: at each refresh boundary, from the events before it),
frozen in the model artifact, read by :meth:`Aggregator.score_then_fold
<sketchstream.models.aggregator.Aggregator.score_then_fold>` against the user's bounded history.

"Liked" here and in the feature: an event whose value is ``>= like_min`` (default 4.0, the
project's engagement label on ratings); "disliked": a value ``< like_min``; events without a
value (nan) are neither.

Storage (no pickle): ``hashes (N,)`` uint64 sorted item hashes (:func:`item_hash`, what user
histories store), ``keys`` int64 sorted ``row * N + col`` (rows/cols index ``hashes``), and
``values`` float32. A lookup maps hashes to rows (:meth:`ItemSimilarity.ranks`), then reads a
bitmap of the pairs (compiled, catalogs up to :data:`BITMAP_MAX_ITEMS` items) or
binary-searches ``keys``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from sketchstream.models import kernels
from sketchstream.models.emde import item_hash
from sketchstream.models.errors import ArtifactError

__all__ = ["CF_NAMES", "CF_NAMES_V1", "ItemSimilarity", "SimilarityBuilder"]

# catalogs up to this size also keep a bitmap of their pairs for the compiled lookups (a bit
# per pair, an int32 offset per 64: 1.5 + 0.8 MB at MovieLens-1M's 3,469 items, 34 + 17 MB at
# 16,384); larger ones search the sorted pair keys
BITMAP_MAX_ITEMS = 16_384

# The CF columns score_then_fold can compute, over the user's bounded history before the event,
# with s = sim(event item, history item): mean s over liked / disliked entries, their
# difference, whether any liked / disliked entry exists; the liked share of the mass
# sum(s) over rated entries, log1p of that mass, and the s-weighted mean value (an item-kNN
# rating estimate; 0 without mass); the largest s over liked / disliked entries; the liked
# share and the weighted mean value again with weights s^2 (the closest neighbours count more).
CF_NAMES = (
    "cf_liked",
    "cf_disliked",
    "cf_difference",
    "cf_has_liked",
    "cf_has_disliked",
    "cf_liked_share",
    "cf_log_mass",
    "cf_weighted_value",
    "cf_max_liked",
    "cf_max_disliked",
    "cf_sharp_liked_share",
    "cf_sharp_value",
)
# what artifacts written before the list grew were trained on
CF_NAMES_V1 = CF_NAMES[:5]


class ItemSimilarity:
    """Sparse symmetric top-K item-item cosine similarity keyed by 64-bit item hashes."""

    def __init__(
        self,
        hashes: np.ndarray,
        keys: np.ndarray,
        values: np.ndarray,
        *,
        top_k: int = 100,
        like_min: float = 4.0,
        columns: tuple[str, ...] = CF_NAMES,
    ) -> None:
        unknown = set(columns) - set(CF_NAMES)
        if unknown:
            raise ArtifactError(f"item similarity: unknown CF columns {sorted(unknown)}")
        self.columns = tuple(columns)  # the CF columns a model reads off this similarity
        self.hashes = np.asarray(hashes, np.uint64)
        self.keys = np.asarray(keys, np.int64)
        self.values = np.asarray(values, np.float32)
        self.top_k = int(top_k)
        self.like_min = float(like_min)
        self._bitmap_cache: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
        self._directory_cache: tuple[np.uint64, np.ndarray, np.ndarray] | None = None

    @classmethod
    def empty(cls, *, top_k: int = 100, like_min: float = 4.0) -> ItemSimilarity:
        z = np.zeros(0, np.int64)
        return cls(z.astype(np.uint64), z, z.astype(np.float32), top_k=top_k, like_min=like_min)

    def __len__(self) -> int:
        return int(self.keys.shape[0])

    @property
    def unknown(self) -> int:
        """The row :meth:`ranks` gives an item the similarity does not know."""
        return int(self.hashes.shape[0])

    def lookup(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """``sim(a[k], b[k])`` ``(m,)`` float32 for item hashes ``a``, ``b``; 0 when unknown."""
        return self.pair_values(self.ranks(a), self.ranks(b))

    def ranks(self, hashes: np.ndarray) -> np.ndarray:
        """Row of each item hash in :attr:`hashes` (intp, the shape of ``hashes``),
        :attr:`unknown` for items without one.

        The hashes are uniform (BLAKE2b), so a directory of their top bits, about 8 buckets
        per item, answers almost every hash with one probe; only a hash whose bucket holds
        several items and is not its first takes a binary search (a plain searchsorted costs
        ~100 ns a hash, the bulk of a lookup).
        """
        h = np.asarray(hashes, np.uint64)
        shift, first, padded = self._directory()
        if kernels.ENABLED and self.unknown:
            out = np.empty(h.shape, np.intp)
            kernels.hash_rows(
                h.reshape(-1), int(shift), first, padded, self.hashes, self.unknown, out.reshape(-1)
            )
            return out
        b = (h >> shift).astype(np.intp)
        lo = first[b]
        hit = padded[lo] == h
        out = np.where(hit, lo, self.unknown)
        rest = np.flatnonzero(~hit & (first[b + 1] - lo > 1))
        if rest.size:
            q = h.reshape(-1)[rest]
            r = np.minimum(np.searchsorted(self.hashes, q), self.unknown - 1)
            out.reshape(-1)[rest] = np.where(self.hashes[r] == q, r, self.unknown)
        return out

    def pair_values(self, ra: np.ndarray, rb: np.ndarray) -> np.ndarray:
        """``sim`` float32 of the items at rows ``ra`` and ``rb`` (:meth:`ranks`, broadcast
        against each other); 0 when either is :attr:`unknown` or the pair is not kept."""
        n = self.unknown
        ra, rb = np.broadcast_arrays(ra, rb)
        out = np.zeros(ra.shape, np.float32)
        if not len(self):
            return out
        table = self.bitmap_table() if kernels.ENABLED else None
        if table is not None:
            kernels.bitmap_values(
                np.ascontiguousarray(ra, np.intp).reshape(-1),
                np.ascontiguousarray(rb, np.intp).reshape(-1),
                *table,
                out.reshape(-1),
            )
            return out
        ok = (ra < n) & (rb < n)
        key = ra[ok].astype(np.int64) * n + rb[ok]
        pos = np.minimum(np.searchsorted(self.keys, key), len(self.keys) - 1)
        out[ok] = np.where(self.keys[pos] == key, self.values[pos], 0.0)
        return out

    def _directory(self) -> tuple[np.uint64, np.ndarray, np.ndarray]:
        """For :meth:`ranks`: the shift to a hash's bucket, each bucket's first row
        (``2^bits + 1``), and the hashes followed by one that never matches a row."""
        if self._directory_cache is None:
            n = self.unknown
            bits = min(n.bit_length() + 3, 20)
            shift = np.uint64(64 - bits)
            top = (self.hashes >> shift).astype(np.intp)
            first = np.searchsorted(top, np.arange((1 << bits) + 1))
            # a hash matching the pad at row n reads as unknown (row n) all the same
            self._directory_cache = (shift, first, np.append(self.hashes, np.uint64(0)))
        return self._directory_cache

    def bitmap_table(self) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """The pairs as a bitmap for the compiled lookups, made once for catalogs of at most
        :data:`BITMAP_MAX_ITEMS` items (None for larger ones): ``bits (N + 1, W)`` uint64, bit
        ``col % 64`` of word ``col // 64`` of row ``row`` set where the pair is kept (row
        and column N, the :attr:`unknown` item's, never), ``first (N + 1, W)`` int32 the
        index in :attr:`values` of each word's first kept pair, and :attr:`values` (in key
        order: row, then column). A pair's value is then ``values[first + the set bits
        below it]``, one word and one value read: 1.5 MB on MovieLens-1M where a dense
        float32 table was 54 MB and a cache miss a pair. Read only."""
        n = self.unknown
        if n > BITMAP_MAX_ITEMS:
            return None
        if self._bitmap_cache is None:
            words = n // 64 + 1  # columns 0 .. n
            rows, cols = np.divmod(self.keys, max(n, 1))
            bits = np.zeros((n + 1) * words, np.uint64)
            # one bit per pair, each its own: their sum is their union
            np.add.at(
                bits,
                rows * words + (cols >> 6),
                np.left_shift(np.uint64(1), (cols & 63).astype(np.uint64)),
            )
            # the keys (row * n + col) are sorted: a word's first pair is the first key at
            # or past its first column (a word with no pair of its row is never read)
            at = np.arange(n + 1)[:, None] * n + np.arange(words)[None, :] * 64
            first = np.searchsorted(self.keys, at.reshape(-1)).astype(np.int32)
            self._bitmap_cache = (
                bits.reshape(n + 1, words),
                first.reshape(n + 1, words),
                self.values,
            )
        return self._bitmap_cache

    def same_as(self, other: ItemSimilarity) -> bool:
        return (
            self.top_k == other.top_k
            and self.like_min == other.like_min
            and self.columns == other.columns
            and np.array_equal(self.hashes, other.hashes)
            and np.array_equal(self.keys, other.keys)
            and np.array_equal(self.values, other.values)
        )

    def config(self) -> dict[str, Any]:
        return {
            "top_k": self.top_k,
            "like_min": self.like_min,
            "pairs": len(self),
            "columns": list(self.columns),
        }

    def tensors(self) -> dict[str, np.ndarray]:
        """For the snapshot's safetensors file."""
        return {
            "sim_hashes": np.ascontiguousarray(self.hashes),
            "sim_keys": np.ascontiguousarray(self.keys),
            "sim_values": np.ascontiguousarray(self.values),
        }

    @classmethod
    def from_tensors(cls, t: dict[str, np.ndarray], meta: dict[str, Any]) -> ItemSimilarity:
        h, k, v = t["sim_hashes"], t["sim_keys"], t["sim_values"]
        if h.dtype != np.uint64 or k.dtype != np.int64 or k.shape != v.shape:
            raise ArtifactError("item similarity: bad tensors")
        if (h.size > 1 and np.any(h[1:] <= h[:-1])) or (k.size > 1 and np.any(k[1:] <= k[:-1])):
            raise ArtifactError("item similarity: hashes/keys not strictly sorted")
        if k.size and (k[0] < 0 or k[-1] >= h.size * h.size):
            raise ArtifactError("item similarity: keys out of range")
        return cls(
            h,
            k,
            v,
            top_k=int(meta["top_k"]),
            like_min=float(meta["like_min"]),
            columns=tuple(meta.get("columns", CF_NAMES_V1)),
        )


class SimilarityBuilder:
    """Accumulates like co-occurrences (dense ``(items, items)`` float32: fine for catalogs up to
    a few 10k items) and builds :class:`ItemSimilarity` snapshots from them."""

    def __init__(self, *, top_k: int = 100, like_min: float = 4.0) -> None:
        self.top_k = int(top_k)
        self.like_min = float(like_min)
        self._index: dict[str, int] = {}
        self._ids: list[str] = []
        self._cooc = np.zeros((0, 0), np.float32)
        self._users: dict[str, int] = {}
        self._liked: list[list[int]] = []  # per user: the items it liked, in order
        self._seen: set[tuple[int, int]] = set()
        self._item_hashes = np.zeros(0, np.uint64)  # of the first items of _ids
        self.likes = 0

    def add(self, users: np.ndarray, items: np.ndarray, value: np.ndarray) -> int:
        """Fold events in (their likes: ``value >= like_min``); returns the new likes.

        A user who liked items ``O`` before and likes ``N`` now adds one to the pairs
        ``N x (O + N)`` and ``O x N``: two block updates of the counts per user, each touching
        only its own pairs (whole counts in float32: exact, in any order).
        """
        value = np.asarray(value, np.float64)
        keep = np.flatnonzero(value >= self.like_min)
        if keep.size == 0:
            return 0
        uu = [self._users.setdefault(str(x), len(self._users)) for x in np.asarray(users)[keep]]
        ii = []
        for x in np.asarray(items, dtype=object)[keep].tolist():
            s = str(x)
            j = self._index.get(s)
            if j is None:
                j = self._index[s] = len(self._ids)
                self._ids.append(s)
            ii.append(j)
        pairs = [(u, i) for u, i in zip(uu, ii, strict=True) if (u, i) not in self._seen]
        pairs = list(dict.fromkeys(pairs))
        if not pairs:
            return 0
        self._seen.update(pairs)
        n_items = len(self._ids)
        if self._cooc.shape[0] < n_items:  # grow by half at least: amortized copies
            size = max(n_items, self._cooc.shape[0] * 3 // 2)
            grown = np.zeros((size, size), np.float32)
            k = self._cooc.shape[0]
            grown[:k, :k] = self._cooc
            self._cooc = grown
        self._liked.extend([] for _ in range(len(self._users) - len(self._liked)))
        new: dict[int, list[int]] = {}
        for u, i in pairs:
            new.setdefault(u, []).append(i)
        for u, got in new.items():
            liked = self._liked[u]
            old = np.array(liked, np.intp)
            liked.extend(got)
            now = np.array(got, np.intp)
            self._cooc[np.ix_(now, np.array(liked, np.intp))] += 1.0
            if old.size:
                self._cooc[np.ix_(old, now)] += 1.0
        self.likes += len(pairs)
        return len(pairs)

    def build(self) -> ItemSimilarity:
        """The current top-K cosine similarity, zero diagonal.

        Row ``i`` keeps item ``j`` when ``C[i, j] / sqrt(C[j, j])`` (its cosine without the
        row's own norm, which does not change the order) is positive and at least the row's
        K-th largest: ties at the K-th value are all kept, so the result does not depend on a
        sort's tie order. A pair is kept when either item keeps the other (symmetric).
        """
        import torch

        n = len(self._ids)
        k = min(self.top_k, n - 1)
        if n == 0 or k <= 0:
            return ItemSimilarity.empty(top_k=self.top_k, like_min=self.like_min)
        c = self._cooc[:n, :n]
        scale = 1.0 / np.sqrt(np.maximum(np.diag(c), 1.0)).astype(np.float32)
        col = torch.from_numpy(c * scale[None, :])
        col.fill_diagonal_(0.0)
        kth = torch.topk(col, k, dim=1, sorted=False).values.min(dim=1, keepdim=True).values
        keep = (col >= kth.clamp_min(np.finfo(np.float32).tiny)).numpy()
        r, q = np.nonzero(keep)
        one_way = ~keep[q, r]  # kept by one side only: add the pair the other way round
        rows, cols = np.concatenate([r, q[one_way]]), np.concatenate([q, r[one_way]])
        hashes, rank = self._ranked_hashes(n)
        order = _key_order(rank[rows], rank[cols], n)
        rows, cols = rows[order], cols[order]
        keys = rank[rows] * n + rank[cols]
        values = c[rows, cols] * scale[rows] * scale[cols]
        return ItemSimilarity(hashes, keys, values, top_k=self.top_k, like_min=self.like_min)

    def _ranked_hashes(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Sorted item hashes of the first ``n`` items, and each item's rank among them (each
        id hashed once, the first time it is built)."""
        done = self._item_hashes.shape[0]
        if done < n:
            self._item_hashes = np.concatenate([self._item_hashes, item_hash(self._ids[done:n])])
        hashes = self._item_hashes[:n]
        order = np.argsort(hashes)
        if np.any(hashes[order][1:] == hashes[order][:-1]):
            raise ArtifactError("item similarity: two item ids share a 64-bit hash")
        rank = np.empty(n, np.int64)
        rank[order] = np.arange(n)
        return hashes[order], rank


def _key_order(row: np.ndarray, col: np.ndarray, n: int) -> np.ndarray:
    """The order of the pairs by key ``row * n + col``: a stable sort by column, then by row;
    for up to 2^16 items both are 16-bit radix sorts, several times faster than sorting the
    64-bit keys."""
    width = np.uint16 if n <= 1 << 16 else np.int64
    by_col = np.argsort(col.astype(width), kind="stable")
    return by_col[np.argsort(row[by_col].astype(width), kind="stable")]
