"""Item-item similarity for the CF feature: cosine of items' like vectors over users, top-K.

Part of the item snapshot (:class:`~sketchstream.models.snapshot.ItemSnapshot.similarity`):
built by the refresh job (offline: at each refresh boundary, from the events before it),
frozen in the model artifact, read by :meth:`Aggregator.score_then_fold
<sketchstream.models.state.Aggregator.score_then_fold>` against the user's bounded history.

"Liked" here and in the feature: an event whose value is ``>= like_min`` (default 4.0, the
project's engagement label on ratings); "disliked": a value ``< like_min``; events without a
value (nan) are neither.

Storage (no pickle): ``hashes (N,)`` uint64 sorted item hashes (:func:`item_hash`, what user
histories store), ``keys`` int64 sorted ``row * N + col`` (rows/cols index ``hashes``), and
``values`` float32; a lookup is two searchsorted passes.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from sketchstream.models.emde import item_hash
from sketchstream.models.errors import ArtifactError

__all__ = ["CF_NAMES", "CF_NAMES_V1", "ItemSimilarity", "SimilarityBuilder"]

# catalogs up to this size also keep a dense copy for lookups (4096 items: 64 MiB)
DENSE_MAX_ITEMS = 4096

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
        self._dense_cache: np.ndarray | None = None

    @classmethod
    def empty(cls, *, top_k: int = 100, like_min: float = 4.0) -> ItemSimilarity:
        z = np.zeros(0, np.int64)
        return cls(z.astype(np.uint64), z, z.astype(np.float32), top_k=top_k, like_min=like_min)

    def __len__(self) -> int:
        return int(self.keys.shape[0])

    def lookup(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """``sim(a[k], b[k])`` ``(m,)`` float32 for item hashes ``a``, ``b``; 0 when unknown."""
        a = np.asarray(a, np.uint64)
        b = np.asarray(b, np.uint64)
        out = np.zeros(a.shape, np.float32)
        n = self.hashes.shape[0]
        if n == 0 or a.size == 0:
            return out
        ra = np.minimum(np.searchsorted(self.hashes, a), n - 1)
        rb = np.minimum(np.searchsorted(self.hashes, b), n - 1)
        ok = (self.hashes[ra] == a) & (self.hashes[rb] == b)
        dense = self._dense()
        if dense is not None:
            out[ok] = dense[ra[ok], rb[ok]]
            return out
        key = ra.astype(np.int64) * n + rb
        pos = np.minimum(np.searchsorted(self.keys, key), len(self.keys) - 1)
        hit = ok & (self.keys[pos] == key)
        out[hit] = self.values[pos[hit]]
        return out

    def _dense(self) -> np.ndarray | None:
        """The pairs as a dense ``(N, N)`` matrix, made on first use for catalogs of at most
        :data:`DENSE_MAX_ITEMS` items (a lookup is then one gather instead of a binary search
        over all pairs); None for larger ones."""
        n = self.hashes.shape[0]
        if n > DENSE_MAX_ITEMS:
            return None
        if self._dense_cache is None:
            dense = np.zeros(n * n, np.float32)
            dense[self.keys] = self.values
            self._dense_cache = dense.reshape(n, n)
        return self._dense_cache

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
        self._hash_cache: tuple[int, np.ndarray, np.ndarray] | None = None
        self.likes = 0

    def add(self, users: np.ndarray, items: np.ndarray, value: np.ndarray) -> int:
        """Fold events in (their likes: ``value >= like_min``); returns the new likes."""
        import scipy.sparse as sp

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
        nu = np.array([p[0] for p in pairs], np.int64)
        ni = np.array([p[1] for p in pairs], np.int64)
        n_items, n_users = len(self._ids), len(self._users)
        if self._cooc.shape[0] < n_items:  # grow by half at least: amortized copies
            size = max(n_items, self._cooc.shape[0] * 3 // 2)
            grown = np.zeros((size, size), np.float32)
            k = self._cooc.shape[0]
            grown[:k, :k] = self._cooc
            self._cooc = grown
        self._liked.extend([] for _ in range(n_users - len(self._liked)))
        old_u = [u for u in dict.fromkeys(nu.tolist()) for _ in self._liked[u]]
        old_i = [i for u in dict.fromkeys(nu.tolist()) for i in self._liked[u]]
        a_new = sp.csr_matrix((np.ones(nu.size, np.float32), (nu, ni)), shape=(n_users, n_items))
        a_old = sp.csr_matrix(
            (np.ones(len(old_u), np.float32), (old_u, old_i)), shape=(n_users, n_items)
        )
        # (old + new)^T (old + new) - old^T old = new^T (old + new) + old^T new
        delta = a_new.T @ (a_old + a_new) + a_old.T @ a_new
        delta.sum_duplicates()  # canonical already (a no-op then): unique (row, col) pairs
        delta = delta.tocoo()
        self._cooc[delta.row, delta.col] += delta.data  # exact: no pair repeats
        for u, i in pairs:
            self._liked[u].append(i)
        self.likes += nu.size
        return int(nu.size)

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
        keep = col >= kth.clamp_min(np.finfo(np.float32).tiny)
        keep = keep | keep.T
        rows, cols = (x.numpy() for x in torch.nonzero(keep, as_tuple=True))
        hashes, rank = self._ranked_hashes(n)
        keys = rank[rows] * n + rank[cols]
        order = np.argsort(keys)
        rows, cols = rows[order], cols[order]
        values = c[rows, cols] * scale[rows] * scale[cols]
        return ItemSimilarity(hashes, keys[order], values, top_k=self.top_k, like_min=self.like_min)

    def _ranked_hashes(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Sorted item hashes of the first ``n`` items, and each item's rank among them."""
        if self._hash_cache is None or self._hash_cache[0] != n:
            hashes = item_hash(self._ids[:n])
            order = np.argsort(hashes)
            rank = np.empty(n, np.int64)
            rank[order] = np.arange(n)
            if np.any(hashes[order][1:] == hashes[order][:-1]):
                raise ArtifactError("item similarity: two item ids share a 64-bit hash")
            self._hash_cache = (n, hashes[order], rank)
        return self._hash_cache[1], self._hash_cache[2]
