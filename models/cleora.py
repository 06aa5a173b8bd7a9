"""Cleora: node embeddings by iterated Markov propagation over a hypergraph.

A :class:`Hypergraph` holds typed entities (users, items, tokens, ...) and weighted
hyperedges, each a left entity joined to a set of right entities. It is stored as the star
expansion: every hyperedge ``(l, {r1, r2, ...})`` becomes undirected edges ``l - r1``,
``l - r2``, ... (duplicate edges add their weights). For a plain two-column relation this is
exactly the graph pycleora 3.x builds from ``columns="left right"``.

:class:`Cleora` then iterates ``E <- rownorm_L2(P @ E)`` with ``P`` the left-Markov
(row-normalized) or symmetrically normalized transition matrix, starting from vectors that
depend only on (entity id, column, seed) (:func:`hashed_init`), or from caller-given vectors
(one-hot labels turn it into label propagation).

Node ids are namespaced strings ``"<type>:<raw id>"`` (``"user:42"``), so a user and an item
with the same raw id are different nodes. Nodes of one type occupy one contiguous block of node
indices; within a block, nodes are ordered by weighted degree, highest first (ties by raw id),
which keeps the rows gathered most often close together in memory.

Three ways to run the propagation, all the same algorithm:

- ``device="scipy"`` (what ``"auto"`` picks without a GPU): numpy buffers and the scipy CSR
  transition matrix; the sparse x dense product runs as torch ``embedding_bag`` over zero-copy
  views of those arrays (a multithreaded gather kernel, several times faster here than scipy's
  single-threaded ``csr @ dense``). Rows are cut into tasks balanced by edge count (a Zipf-head
  item's row is split into pieces summed afterwards) and handed to a pool of single-threaded
  torch workers; each task's output is normalized while it is still in cache. On a two-type
  graph the update is done in place: a new left block depends only on the old right block and
  vice versa, so only the smaller block needs a second buffer.
- ``device="cpu"`` / ``device="cuda"``: torch sparse CSR matmul on that device, two full
  buffers, the hashed initial vectors made there too (the same bits). ``"cpu"`` exists so tests
  can check the torch path against the scipy path.

Over 600 lines for one thing: the hypergraph and the propagation over it, whose node order,
task balancing and in-place update are what make it several times faster than pycleora
(README, ``bench cleora``); the three backends share the graph and must stay interchangeable.
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import cached_property
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import scipy.sparse as sp
from sketchstream.models.errors import ModelError, NotFittedError

if TYPE_CHECKING:
    import torch

__all__ = [
    "Cleora",
    "Device",
    "Hypergraph",
    "Normalization",
    "hashed_init",
]

logger = logging.getLogger(__name__)

Normalization = Literal["left", "symmetric"]
Device = Literal["auto", "scipy", "cpu", "cuda"]

_NORMALIZATIONS = ("left", "symmetric")
_DEVICES = ("auto", "scipy", "cpu", "cuda")
# Rows whose norm is below this stay zero instead of blowing up (isolated nodes, unlabelled
# nodes under label propagation).
_EPS = 1e-30
# Bytes of output per row chunk in the scipy path: small enough to stay in a core's L2 while
# the chunk is normalized, large enough that per-task overhead does not matter.
_CHUNK_BYTES = 1 << 20

_U64 = np.uint64
_MASK64 = (1 << 64) - 1


# --------------------------------------------------------------------------------------------
# Deterministic initialization
# --------------------------------------------------------------------------------------------


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finalizer, elementwise on a uint64 array (wrapping arithmetic)."""
    x = x.copy()
    x ^= x >> _U64(30)
    x *= _U64(0xBF58476D1CE4E5B9)
    x ^= x >> _U64(27)
    x *= _U64(0x94D049BB133111EB)
    x ^= x >> _U64(31)
    return x


def _fnv1a64(utf8: np.ndarray) -> np.ndarray:
    """FNV-1a 64-bit hash of each bytes string in a numpy ``S`` array, shape (n,) uint64.

    Vectorized over strings, looping over byte positions; bytes past a string's own length
    (numpy's NUL padding) are skipped, so a hash never depends on the batch it came in.
    """
    n = utf8.shape[0]
    width = utf8.dtype.itemsize
    h = np.full(n, 0xCBF29CE484222325, dtype=_U64)
    if n == 0 or width == 0:
        return h
    data = np.ascontiguousarray(utf8).view(np.uint8).reshape(n, width)
    lengths = np.strings.str_len(utf8)
    prime = _U64(0x100000001B3)
    for pos in range(width):
        live = lengths > pos
        if not live.any():
            break
        mixed = (h ^ data[:, pos].astype(_U64)) * prime
        np.copyto(h, mixed, where=live)
    return h


def _entity_keys(node_ids: Sequence[str] | np.ndarray, seed: int) -> np.ndarray:
    """One well-mixed 64-bit key per node id, shape (n,) uint64."""
    ids = np.asarray(node_ids)
    if ids.ndim != 1:
        raise ModelError(f"node_ids must be one-dimensional, got shape {ids.shape}")
    if ids.size and ids.dtype.kind not in "UT":
        ids = ids.astype(str)
    utf8 = np.strings.encode(ids, "utf-8") if ids.size else np.empty(0, dtype="S1")
    seed_key = _splitmix64(np.array([(seed + 0x9E3779B97F4A7C15) & _MASK64], dtype=_U64))
    return _splitmix64(_fnv1a64(utf8) ^ seed_key[0])


# Column keys are fixed (the seed enters through the entity key), 32-bit.
def _column_keys(dim: int) -> np.ndarray:
    cols = np.arange(1, dim + 1, dtype=_U64)
    return (_splitmix64(cols) & _U64(0xFFFFFFFF)).astype(np.uint32)


# The cell hash of the init, shared by the numpy fill and the torch one (which must give the
# same bits): the two multipliers, the two shifts, and the exponent bits of a float in [2, 4).
_MIX_A, _MIX_B = 0x85EBCA6B, 0xC2B2AE35
_SHIFT_MIX, _SHIFT_MANTISSA = 15, 9
_EXP_2_TO_4 = 0x40000000


def _fill_hashed(keys: np.ndarray, col_keys: np.ndarray, out: np.ndarray) -> None:
    """Write the init vectors of ``keys`` (n,) uint64 into ``out`` (n, dim) float32.

    Cell (i, j): x = lo32(k_i) ^ c_j; x *= A; x ^= x >> 15; x ^= hi32(k_i); x *= B; the top 23
    bits of x become the mantissa of a float in [2, 4), shifted to [-1, 1). All uint32
    arithmetic wraps, so the bits are the same on every machine. In-place ufuncs on a small
    chunk keep the work in cache.
    """
    lo = (keys & _U64(0xFFFFFFFF)).astype(np.uint32)[:, None]
    hi = (keys >> _U64(32)).astype(np.uint32)[:, None]
    x = out.view(np.uint32)
    tmp = np.empty_like(x)
    np.bitwise_xor(lo, col_keys[None, :], out=x)
    np.multiply(x, np.uint32(_MIX_A), out=x)
    np.right_shift(x, np.uint32(_SHIFT_MIX), out=tmp)
    np.bitwise_xor(x, tmp, out=x)
    np.bitwise_xor(x, hi, out=x)
    np.multiply(x, np.uint32(_MIX_B), out=x)
    np.right_shift(x, np.uint32(_SHIFT_MANTISSA), out=x)
    np.bitwise_or(x, np.uint32(_EXP_2_TO_4), out=x)
    np.subtract(out, np.float32(3.0), out=out)


def _hashed_init_into(keys: np.ndarray, out: np.ndarray, n_threads: int | None = None) -> None:
    """Fill ``out`` (n, dim) float32 from entity keys, in cache-sized row chunks on threads."""
    n, dim = out.shape
    if n == 0 or dim == 0:
        return
    n_threads = n_threads or min(8, os.cpu_count() or 1)
    col_keys = _column_keys(dim)
    rows = max(1, (256 << 10) // (4 * dim))
    starts = range(0, n, rows)

    def job(a: int) -> None:
        z = min(a + rows, n)
        _fill_hashed(keys[a:z], col_keys, out[a:z])

    if n_threads > 1 and n > rows:
        # numpy releases the GIL inside these ufunc loops, so chunks run truly in parallel.
        with ThreadPoolExecutor(n_threads) as pool:
            list(pool.map(job, starts))
    else:
        for a in starts:
            job(a)


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """``(x * c) mod 2**32`` for int64 ``x`` and ``c`` in [0, 2**32), with no product past 2**49
    (a plain int64 product would overflow)."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & 0xFFFFFFFF


def _hashed_init_torch(keys: np.ndarray, dim: int, device: str) -> torch.Tensor:
    """:func:`_fill_hashed`'s values, bit for bit, made on ``device`` (the torch paths).

    On a GPU the host would take longer over the init than the GPU over every iteration, and
    the buffer would then cross to the device; here only the keys cross. The uint32 arithmetic
    runs in int64 masked to 32 bits, in row chunks of 64 MiB temporaries.
    """
    import torch

    dev = torch.device(device)
    n = keys.shape[0]
    out = torch.empty((n, dim), dtype=torch.float32, device=dev)
    k = torch.from_numpy(keys.view(np.int64)).to(dev)
    lo, hi = k & 0xFFFFFFFF, (k >> 32) & 0xFFFFFFFF
    cols = torch.from_numpy(_column_keys(dim).astype(np.int64)).to(dev)
    rows = max(1, (64 << 20) // (8 * dim))
    for a in range(0, n, rows):
        z = min(a + rows, n)
        x = _mul32(lo[a:z, None] ^ cols[None, :], _MIX_A)
        x ^= x >> _SHIFT_MIX
        x ^= hi[a:z, None]
        x = _mul32(x, _MIX_B)
        x >>= _SHIFT_MANTISSA
        x |= _EXP_2_TO_4
        out[a:z] = x.to(torch.int32).view(torch.float32)
    return out.sub_(3.0)


def hashed_init(node_ids: Sequence[str] | np.ndarray, dim: int, seed: int = 0) -> np.ndarray:
    """Deterministic initial vectors: a function of (node id, column, seed) only.

    The same id gets bit-identical values on every machine, process and run, whatever other
    nodes are present and in whatever order, so successive refreshes of a graph start from the
    same place. Values are uniform-ish in [-1, 1) with 2^-22 resolution.

    Args:
        node_ids: (n,) ids, normally the namespaced ``"type:raw"`` strings of
            :attr:`Hypergraph.node_ids`; non-strings are converted with ``str``.
        dim: columns, >= 1.
        seed: any integer in [0, 2^64).

    Returns:
        (n, dim) float32, not normalized.
    """
    dim = _check_int("dim", dim, minimum=1)
    seed = _check_seed(seed)
    keys = _entity_keys(node_ids, seed)
    out = np.empty((keys.shape[0], dim), dtype=np.float32)
    _hashed_init_into(keys, out)
    return out


# --------------------------------------------------------------------------------------------
# Hypergraph
# --------------------------------------------------------------------------------------------


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise ModelError(f"{name} must be an integer >= {minimum}, got {value!r}")
    if value < minimum:
        raise ModelError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _check_seed(seed: Any) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or not 0 <= seed <= _MASK64:
        raise ModelError(f"seed must be an integer in [0, 2**64), got {seed!r}")
    return int(seed)


def _check_type_name(name: str, value: Any) -> str:
    if not isinstance(value, str) or not value or ":" in value:
        raise ModelError(f"{name} must be a non-empty string without ':', got {value!r}")
    return value


def _edge_columns(names: tuple[str, str], left: Any, right: Any) -> tuple[np.ndarray, np.ndarray]:
    """The two ends of the edges as ``(n_edges,)`` arrays: 1-d, of equal length, not empty."""
    lc, rc = np.asarray(left), np.asarray(right)
    if lc.ndim != 1 or rc.ndim != 1 or lc.shape != rc.shape:
        raise ModelError(
            f"{names[0]} and {names[1]} must be 1-d of equal length, got shapes {lc.shape} "
            f"and {rc.shape}"
        )
    if lc.size == 0:
        raise ModelError("empty graph: no edges given; pass at least one (left, right) pair")
    return lc, rc


def _as_weights(weights: Any, n_edges: int) -> np.ndarray:
    if weights is None:
        return np.ones(n_edges, dtype=np.float32)
    w = np.asarray(weights, dtype=np.float32)
    if w.shape != (n_edges,):
        raise ModelError(f"weights has shape {w.shape}, expected ({n_edges},): one per edge")
    if not np.all(np.isfinite(w)) or np.any(w < 0):
        bad = int(np.flatnonzero(~np.isfinite(w) | (w < 0))[0])
        raise ModelError(f"weights must be finite and >= 0; weights[{bad}] = {w[bad]}")
    return w


def _node_order(codes: np.ndarray, weights: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Order the codes that occur: highest weighted degree first, ties by code.

    Returns ``order`` (n_present,), the codes in node order, and ``rank`` (n,), the node
    position of each code (meaningless for codes that never occur: they get no node).
    """
    present = np.bincount(codes, minlength=n) > 0
    degree = np.bincount(codes, weights=weights, minlength=n)
    order = np.argsort(-degree, kind="stable")
    order = order[present[order]]
    rank = np.zeros(n, dtype=_index_dtype(n))
    rank[order] = np.arange(order.shape[0], dtype=rank.dtype)
    return order, rank


def _index_dtype(n: int) -> type[np.integer]:
    return np.int32 if n < 2**31 else np.int64


class Hypergraph:
    """Typed entities joined by weighted hyperedges (stored as their star expansion).

    Build one with :meth:`from_edges`, :meth:`from_hyperedges` or, for integer-coded data at
    scale, :meth:`from_arrays`. Nodes of each type form one contiguous block of node indices
    (``types[0]`` first).

    Attributes:
        types: entity types, left type first; one type when left and right types are equal.
        adjacency: (n_nodes, n_nodes) float32 CSR, symmetric; entry (i, j) is the summed
            weight of the edges between nodes i and j.
    """

    def __init__(
        self,
        types: Sequence[str],
        raw_ids: Sequence[np.ndarray],
        adjacency: sp.csr_array,
    ) -> None:
        if len(types) != len(raw_ids) or len(types) not in (1, 2):
            raise ModelError(f"need one or two entity types with their ids, got {list(types)}")
        n = sum(len(ids) for ids in raw_ids)
        if adjacency.shape != (n, n):
            raise ModelError(f"adjacency has shape {adjacency.shape}, expected ({n}, {n})")
        self.types: tuple[str, ...] = tuple(types)
        self._raw_ids: tuple[np.ndarray, ...] = tuple(raw_ids)
        self.adjacency: sp.csr_array = adjacency
        self._offsets = np.cumsum([0, *(len(ids) for ids in raw_ids)])

    # -- constructors -------------------------------------------------------------------------

    @classmethod
    def from_arrays(
        cls,
        left_codes: np.ndarray,
        right_codes: np.ndarray,
        n_left: int,
        n_right: int,
        weights: np.ndarray | None = None,
        left_type: str = "left",
        right_type: str = "right",
        left_ids: np.ndarray | None = None,
        right_ids: np.ndarray | None = None,
    ) -> Hypergraph:
        """Build from integer-coded edges, fully vectorized (the fast path at scale).

        Args:
            left_codes, right_codes: (n_edges,) integers in [0, n_left) / [0, n_right); one
                edge per position. With ``left_type == right_type`` both index the same ids and
                ``n_left`` must equal ``n_right``.
            n_left, n_right: number of left / right codes; codes that occur in no edge get
                no node.
            weights: (n_edges,) finite non-negative edge weights, default 1; duplicates add up.
            left_ids, right_ids: (n_left,) / (n_right,) raw ids of the codes; default the codes.
        """
        left_type = _check_type_name("left_type", left_type)
        right_type = _check_type_name("right_type", right_type)
        n_left = _check_int("n_left", n_left, minimum=1)
        n_right = _check_int("n_right", n_right, minimum=1)
        lc, rc = _edge_columns(("left_codes", "right_codes"), left_codes, right_codes)
        for name, codes, bound in (("left_codes", lc, n_left), ("right_codes", rc, n_right)):
            if codes.dtype.kind not in "iu":
                raise ModelError(f"{name} must be integers, got dtype {codes.dtype}")
            lo, hi = int(codes.min()), int(codes.max())
            if lo < 0 or hi >= bound:
                raise ModelError(f"{name} must lie in [0, {bound}), got values in [{lo}, {hi}]")
        w = _as_weights(weights, lc.shape[0])
        ids = []
        for name, given, n in (("left_ids", left_ids, n_left), ("right_ids", right_ids, n_right)):
            arr = np.arange(n) if given is None else np.asarray(given)
            if arr.shape != (n,):
                raise ModelError(f"{name} has shape {arr.shape}, expected ({n},)")
            ids.append(arr)
        if left_type == right_type:
            if n_left != n_right:
                raise ModelError(
                    f"left and right type are both {left_type!r}, so n_left ({n_left}) must "
                    f"equal n_right ({n_right})"
                )
            return cls._build_one_type(lc, rc, w, n_left, left_type, ids[0])
        return cls._build_bipartite(lc, rc, w, n_left, n_right, (left_type, right_type), ids)

    @classmethod
    def from_edges(
        cls,
        left_ids: Sequence[Any] | np.ndarray,
        right_ids: Sequence[Any] | np.ndarray,
        weights: Sequence[float] | np.ndarray | None = None,
        left_type: str = "user",
        right_type: str = "item",
    ) -> Hypergraph:
        """Build from raw-id edges: one (left id, right id) pair per position.

        All rows with the same left id form one hyperedge. Raw ids may be str or int (of one
        kind per side); ``"user:1"`` and ``"item:1"`` are different nodes.
        """
        left, right = _edge_columns(("left_ids", "right_ids"), left_ids, right_ids)
        if left_type == right_type:
            uniq, codes = np.unique(np.concatenate([left, right]), return_inverse=True)
            codes = codes.ravel()
            lc, rc = codes[: left.size], codes[left.size :]
            return cls.from_arrays(
                lc, rc, uniq.size, uniq.size, weights, left_type, right_type, uniq, uniq
            )
        lu, lc = np.unique(left, return_inverse=True)
        ru, rc = np.unique(right, return_inverse=True)
        return cls.from_arrays(
            lc.ravel(), rc.ravel(), lu.size, ru.size, weights, left_type, right_type, lu, ru
        )

    @classmethod
    def from_hyperedges(
        cls,
        hyperedges: Sequence[tuple[Any, Sequence[Any]]],
        left_type: str = "item",
        right_type: str = "token",
        weights: Sequence[float | Sequence[float]] | None = None,
    ) -> Hypergraph:
        """Build from ``[(left_id, [right_id, ...]), ...]``.

        Args:
            weights: optional, one entry per hyperedge: a number applied to each of its members,
                or a sequence with one weight per member.
        """
        lefts: list[Any] = []
        rights: list[Any] = []
        ws: list[float] = []
        if weights is not None and len(weights) != len(hyperedges):
            raise ModelError(
                f"weights has {len(weights)} entries, expected one per hyperedge "
                f"({len(hyperedges)})"
            )
        for k, edge in enumerate(hyperedges):
            try:
                left, members = edge
            except (TypeError, ValueError):
                raise ModelError(
                    f"hyperedge {k} must be (left_id, [right_id, ...]), got {edge!r}"
                ) from None
            if isinstance(members, str | bytes) or not isinstance(members, Sequence | np.ndarray):
                raise ModelError(f"hyperedge {k}: right ids must be a sequence, got {members!r}")
            members = list(members)
            lefts.extend([left] * len(members))
            rights.extend(members)
            if weights is not None:
                wk = weights[k]
                if np.ndim(wk) == 0:
                    ws.extend([float(wk)] * len(members))
                else:
                    if len(wk) != len(members):
                        raise ModelError(
                            f"hyperedge {k} has {len(members)} members but {len(wk)} weights"
                        )
                    ws.extend(float(x) for x in wk)
        return cls.from_edges(
            lefts, rights, ws if weights is not None else None, left_type, right_type
        )

    @classmethod
    def _build_bipartite(
        cls,
        lc: np.ndarray,
        rc: np.ndarray,
        w: np.ndarray,
        n_left: int,
        n_right: int,
        types: tuple[str, str],
        ids: list[np.ndarray],
    ) -> Hypergraph:
        order_l, rank_l = _node_order(lc, w, n_left)
        order_r, rank_r = _node_order(rc, w, n_right)
        n_left, n_right = order_l.shape[0], order_r.shape[0]
        rows, cols = rank_l[lc], rank_r[rc]
        # scipy's COO -> CSR is a linear counting sort that also sums duplicate edges;
        # the transpose block is another linear pass (CSR -> CSC).
        b = sp.csr_array((w, (rows, cols)), shape=(n_left, n_right), dtype=np.float32)
        b.sum_duplicates()
        bt = b.T.tocsr()
        bt.sum_duplicates()
        n = n_left + n_right
        nnz = b.nnz + bt.nnz
        ptype = _index_dtype(nnz)
        indptr = np.concatenate([b.indptr, b.indptr[-1] + bt.indptr[1:]]).astype(ptype)
        indices = np.concatenate(
            [b.indices.astype(_index_dtype(n)) + n_left, bt.indices.astype(_index_dtype(n))]
        )
        data = np.concatenate([b.data, bt.data])
        adj = sp.csr_array((data, indices, indptr), shape=(n, n))
        adj.has_sorted_indices = True
        return cls(types, [ids[0][order_l], ids[1][order_r]], adj)

    @classmethod
    def _build_one_type(
        cls, lc: np.ndarray, rc: np.ndarray, w: np.ndarray, n: int, node_type: str, ids: np.ndarray
    ) -> Hypergraph:
        # An edge i - j contributes to both (i, j) and (j, i); a self-loop only once.
        off = lc != rc
        rows = np.concatenate([lc, rc[off]])
        cols = np.concatenate([rc, lc[off]])
        ww = np.concatenate([w, w[off]])
        order, rank = _node_order(rows, ww, n)
        n = order.shape[0]
        adj = sp.csr_array((ww, (rank[rows], rank[cols])), shape=(n, n), dtype=np.float32)
        adj.sum_duplicates()
        return cls((node_type,), [ids[order]], adj)

    # -- structure ----------------------------------------------------------------------------

    @property
    def n_nodes(self) -> int:
        """Number of nodes over all types."""
        return int(self._offsets[-1])

    @property
    def n_edges(self) -> int:
        """Number of distinct stored (directed) adjacency entries."""
        return int(self.adjacency.nnz)

    @cached_property
    def node_ids(self) -> np.ndarray:
        """(n_nodes,) str: namespaced ids ``"<type>:<raw id>"`` in node-index order."""
        parts = [
            np.strings.add(f"{t}:", np.asarray(ids).astype(str))
            for t, ids in zip(self.types, self._raw_ids, strict=True)
        ]
        return np.concatenate(parts)

    def type_slice(self, node_type: str) -> slice:
        """Node indices of one type (a contiguous block)."""
        try:
            k = self.types.index(node_type)
        except ValueError:
            raise ModelError(
                f"unknown node type {node_type!r}: expected one of {', '.join(self.types)}"
            ) from None
        return slice(int(self._offsets[k]), int(self._offsets[k + 1]))

    def nodes_of_type(self, node_type: str) -> tuple[np.ndarray, np.ndarray]:
        """Raw ids (n_type,) and node indices (n_type,) of the nodes of one type."""
        s = self.type_slice(node_type)
        return self._raw_ids[self.types.index(node_type)], np.arange(s.start, s.stop)

    def node_index(self, node_type: str, raw_id: Any) -> int:
        """Node index of one entity (linear scan of its type: for tests and notebooks)."""
        raw, idx = self.nodes_of_type(node_type)
        hits = np.flatnonzero(raw == np.asarray(raw_id, dtype=raw.dtype))
        if hits.size == 0:
            raise ModelError(f"no node {node_type}:{raw_id} in this graph")
        return int(idx[hits[0]])

    def transition(self, normalization: Normalization = "left") -> sp.csr_array:
        """The (n_nodes, n_nodes) float32 CSR transition matrix.

        ``"left"``: ``D^-1 A`` (rows sum to 1, the Markov matrix of a random walk).
        ``"symmetric"``: ``D^-1/2 A D^-1/2``. Rows of isolated nodes are zero.
        """
        if normalization not in _NORMALIZATIONS:
            raise ModelError(
                f"unknown normalization {normalization!r}: expected one of "
                f"{', '.join(_NORMALIZATIONS)}"
            )
        adj = self.adjacency
        deg = np.asarray(adj.sum(axis=1), dtype=np.float64).ravel()
        with np.errstate(divide="ignore"):
            if normalization == "left":
                row_scale = np.where(deg > 0, 1.0 / deg, 0.0).astype(np.float32)
                col_scale = None
            else:
                row_scale = np.where(deg > 0, 1.0 / np.sqrt(deg), 0.0).astype(np.float32)
                col_scale = row_scale
        data = adj.data * np.repeat(row_scale, np.diff(adj.indptr))
        if col_scale is not None:
            data *= col_scale[adj.indices]
        p = sp.csr_array(
            (data.astype(np.float32, copy=False), adj.indices, adj.indptr), shape=adj.shape
        )
        p.has_sorted_indices = True
        return p

    def __repr__(self) -> str:
        sizes = ", ".join(
            f"{t}={len(ids)}" for t, ids in zip(self.types, self._raw_ids, strict=True)
        )
        return f"Hypergraph({sizes}, adjacency_nnz={self.adjacency.nnz})"


# --------------------------------------------------------------------------------------------
# Propagation kernels
# --------------------------------------------------------------------------------------------


class _RowBlock:
    """Rows [start, stop) of a CSR matrix whose columns all fall in one node block.

    Column indices are stored relative to that source block, as torch tensors sharing memory
    with numpy arrays, ready for ``embedding_bag``.
    """

    def __init__(self, p: sp.csr_array, start: int, stop: int, src_start: int) -> None:
        import torch

        p0, p1 = int(p.indptr[start]), int(p.indptr[stop])
        itype = np.int32 if p1 - p0 < 2**31 else np.int64
        self.start, self.stop = start, stop
        self.indptr_np = (p.indptr[start : stop + 1] - p0).astype(itype)
        self.indptr = torch.from_numpy(self.indptr_np)
        idx = p.indices[p0:p1]
        self.indices = torch.from_numpy((idx - src_start).astype(itype) if src_start else idx)
        if self.indices.dtype != self.indptr.dtype:
            self.indices = self.indices.to(self.indptr.dtype)
        self.data = torch.from_numpy(p.data[p0:p1])
        self._plans: dict[tuple[int, int], _Plan] = {}

    def plan(self, chunk_rows: int, n_threads: int) -> _Plan:
        """Split the rows into tasks of at most ``chunk_rows`` rows and balanced edge counts.

        Popular nodes (a Zipf head item can hold a tenth of all edges) would otherwise make
        one task as long as all the others together; rows with more edges than one task's
        budget are split into pieces whose partial sums are added afterwards.
        """
        key = (chunk_rows, n_threads)
        if key not in self._plans:
            self._plans[key] = _Plan.build(self.indptr_np, chunk_rows, n_threads)
        return self._plans[key]


class _Plan:
    """Row chunks ``(a, z)`` and, for heavy rows, edge pieces ``(row, e0, e1)``."""

    def __init__(self, chunks: list[tuple[int, int]], pieces: list[tuple[int, int, int]]):
        self.chunks = chunks
        self.pieces = pieces

    @classmethod
    def build(cls, indptr: np.ndarray, chunk_rows: int, n_threads: int) -> _Plan:
        n_rows = indptr.shape[0] - 1
        nnz = int(indptr[-1])
        # Several tasks per thread so that the pool can even out uneven progress.
        budget = max(4096, -(-nnz // (16 * max(1, n_threads))))
        degree = np.diff(indptr)
        heavy = np.flatnonzero(degree > budget)
        pieces = [
            (int(r), int(e0), int(min(e0 + budget, indptr[r + 1])))
            for r in heavy
            for e0 in range(int(indptr[r]), int(indptr[r + 1]), budget)
        ]
        is_heavy = np.zeros(n_rows, dtype=bool)
        is_heavy[heavy] = True
        chunks: list[tuple[int, int]] = []
        a = 0
        while a < n_rows:
            if is_heavy[a]:
                a += 1
                continue
            # Stop before the row that would push the chunk over its edge budget, and before
            # any heavy row.
            z_nnz = int(np.searchsorted(indptr, indptr[a] + budget, side="right")) - 1
            z = max(a + 1, min(a + chunk_rows, z_nnz, n_rows))
            nxt = np.flatnonzero(is_heavy[a:z])
            if nxt.size:
                z = a + int(nxt[0])
            chunks.append((a, z))
            a = z
        return cls(chunks, pieces)


def _propagate_rows(
    block: _RowBlock,
    src: torch.Tensor,
    dst: torch.Tensor,
    pool: ThreadPoolExecutor,
    n_threads: int,
) -> None:
    """``dst = rownorm_L2(P[rows] @ src)``, in tasks spread over ``pool``'s threads.

    ``dst`` (n_rows, dim) may overwrite memory that ``src`` does not read. Each row chunk is
    produced and normalized into ``dst`` while it is still in the core's cache.
    """
    import torch
    import torch.nn.functional as F

    dim = dst.shape[1]
    plan = block.plan(max(64, _CHUNK_BYTES // (4 * dim)), n_threads)
    ptr = block.indptr
    partial = torch.empty((len(plan.pieces), dim), dtype=dst.dtype)

    def chunk_job(az: tuple[int, int]) -> None:
        a, z = az
        p0, p1 = int(ptr[a]), int(ptr[z])
        out = F.embedding_bag(
            block.indices[p0:p1],
            src,
            ptr[a:z] - p0,
            mode="sum",
            per_sample_weights=block.data[p0:p1],
        )
        F.normalize(out, dim=1, eps=_EPS, out=dst[a:z])

    def piece_job(k: int) -> None:
        _, e0, e1 = plan.pieces[k]
        partial[k] = F.embedding_bag(
            block.indices[e0:e1],
            src,
            torch.zeros(1, dtype=ptr.dtype),
            mode="sum",
            per_sample_weights=block.data[e0:e1],
        )[0]

    # Heavy pieces first (the longest tasks), then chunks; the pool hands tasks to whichever
    # thread is free, so a thread slowed down by a busy machine just takes fewer.
    futures = [pool.submit(piece_job, k) for k in range(len(plan.pieces))]
    futures += [pool.submit(chunk_job, az) for az in plan.chunks]
    for f in futures:
        f.result()
    if plan.pieces:
        rows = torch.tensor([r for r, _, _ in plan.pieces])
        uniq, inverse = torch.unique(rows, return_inverse=True)
        sums = torch.zeros((uniq.shape[0], dim), dtype=dst.dtype).index_add_(0, inverse, partial)
        dst[uniq] = F.normalize(sums, dim=1, eps=_EPS)


def _propagate_scipy(
    p: sp.csr_array, emb: np.ndarray, iterations: int, graph: Hypergraph
) -> np.ndarray:
    """Iterate ``emb <- rownorm(P @ emb)`` in place on host memory; returns ``emb``."""
    import torch

    n_threads = torch.get_num_threads()
    # One torch thread per worker: torch's own OpenMP teams would sync at a barrier after
    # every small op, which stalls badly when the cores are shared. set_num_threads also sets
    # MKL's global count, so the caller's setting is restored at the end.
    pool = ThreadPoolExecutor(n_threads, initializer=torch.set_num_threads, initargs=(1,))
    try:
        return _propagate_host(p, emb, iterations, graph, pool, n_threads)
    finally:
        pool.shutdown()
        torch.set_num_threads(n_threads)


def _propagate_host(
    p: sp.csr_array,
    emb: np.ndarray,
    iterations: int,
    graph: Hypergraph,
    pool: ThreadPoolExecutor,
    n_threads: int,
) -> np.ndarray:
    import torch

    t_start = time.perf_counter()
    e = torch.from_numpy(emb)

    def done(it: int) -> None:
        elapsed = time.perf_counter() - t_start
        logger.info("cleora iteration %d/%d done (%.1f s)", it + 1, iterations, elapsed)

    if len(graph.types) == 2:
        s_left, s_right = graph.type_slice(graph.types[0]), graph.type_slice(graph.types[1])
        # The smaller block gets the second buffer; the larger is updated in place.
        small, big = sorted((s_left, s_right), key=lambda s: s.stop - s.start)
        small_rows = _RowBlock(p, small.start, small.stop, big.start)
        big_rows = _RowBlock(p, big.start, big.stop, small.start)
        cur_small = e[small]
        alt_small = torch.empty_like(cur_small)
        e_big = e[big]
        for it in range(iterations):
            # Jacobi step: new small from old big (into the spare buffer), then new big from
            # old small (in place: old big is no longer needed).
            _propagate_rows(small_rows, e_big, alt_small, pool, n_threads)
            _propagate_rows(big_rows, cur_small, e_big, pool, n_threads)
            cur_small, alt_small = alt_small, cur_small
            done(it)
        if cur_small.data_ptr() != e[small].data_ptr():
            e[small].copy_(cur_small)
        return emb
    rows = _RowBlock(p, 0, p.shape[0], 0)
    cur, alt = e, torch.empty_like(e)
    for it in range(iterations):
        _propagate_rows(rows, cur, alt, pool, n_threads)
        cur, alt = alt, cur
        done(it)
    if cur.data_ptr() != e.data_ptr():
        e.copy_(cur)
    return emb


def _propagate_torch(
    p: sp.csr_array,
    emb: np.ndarray | None,
    iterations: int,
    device: str,
    *,
    keys: np.ndarray | None = None,
    dim: int = 0,
) -> np.ndarray:
    """Iterate ``emb <- rownorm(P @ emb)`` with torch sparse CSR on ``device``.

    ``emb`` is the host's initial (n, dim) array, or None: then the hashed init of ``keys`` is
    made on the device (nothing else holds it, so it is freed after the first iteration).
    """
    import torch

    t_start = time.perf_counter()
    dev = torch.device(device)
    with warnings.catch_warnings():
        # "Sparse CSR tensor support is in beta": we use only CSR @ dense.
        warnings.simplefilter("ignore", UserWarning)
        pt = torch.sparse_csr_tensor(
            torch.from_numpy(p.indptr.astype(np.int64)),
            torch.from_numpy(p.indices.astype(np.int64)),
            torch.from_numpy(p.data),
            size=p.shape,
            check_invariants=False,
        ).to(dev)
    if emb is None:
        assert keys is not None
        x = _hashed_init_torch(keys, dim, device)
    else:
        x = torch.from_numpy(emb).to(dev)
    for it in range(iterations):
        x = torch.sparse.mm(pt, x)
        x.div_(torch.linalg.vector_norm(x, dim=1, keepdim=True).clamp_min_(_EPS))
        logger.info(
            "cleora iteration %d/%d done on %s (%.1f s)",
            it + 1,
            iterations,
            device,
            time.perf_counter() - t_start,
        )
    return x.cpu().numpy()


def _resolve_device(device: str) -> str:
    if device not in _DEVICES:
        raise ModelError(f"unknown device {device!r}: expected one of {', '.join(_DEVICES)}")
    if device == "scipy" or device == "cpu":
        return device
    import torch

    has_cuda = torch.cuda.is_available()
    if device == "cuda" and not has_cuda:
        raise ModelError("device='cuda' but torch sees no CUDA GPU; use 'auto' or 'scipy'")
    if device == "auto":
        return "cuda" if has_cuda else "scipy"
    return device


# --------------------------------------------------------------------------------------------
# Estimator
# --------------------------------------------------------------------------------------------


class Cleora:
    """Cleora node embeddings: ``E <- rownorm_L2(P @ E)``, ``iterations`` times.

    Args:
        dim: embedding width, >= 1.
        iterations: number of propagation steps, >= 0 (0 returns the normalized init).
        seed: seed of :func:`hashed_init`, in [0, 2^64).
        normalization: transition matrix, ``"left"`` (row-stochastic, as pycleora's
            ``propagation="left"``) or ``"symmetric"``.
        device: ``"auto"`` (CUDA if torch sees a GPU, else ``"scipy"``), ``"scipy"`` (host
            path), ``"cpu"`` or ``"cuda"`` (torch sparse CSR on that device).
        init: optional caller-given initial vectors instead of :func:`hashed_init`: an
            (n_nodes, dim) array in node order, or a mapping from namespaced node id
            (``"item:7"``) to a (dim,) vector; nodes missing from a mapping start at zero
            (one-hot labels on some nodes = label propagation).

    Attributes (after :meth:`fit`):
        embeddings_: (n_nodes, dim) float32; rows have unit L2 norm (rows that stay zero,
            e.g. isolated or never-reached nodes under label propagation, stay zero).
        graph_: the :class:`Hypergraph` it was fitted on.
        device_: the device that actually ran.
    """

    def __init__(
        self,
        dim: int = 128,
        iterations: int = 4,
        seed: int = 0,
        normalization: Normalization = "left",
        device: Device = "auto",
        init: np.ndarray | Mapping[str, Any] | None = None,
    ) -> None:
        self.dim = dim
        self.iterations = iterations
        self.seed = seed
        self.normalization = normalization
        self.device = device
        self.init = init

    def fit(self, graph: Hypergraph) -> Cleora:
        """Embed every node of ``graph``; returns ``self``."""
        if not isinstance(graph, Hypergraph):
            raise ModelError(f"fit expects a Hypergraph, got {type(graph).__name__}")
        dim = _check_int("dim", self.dim, minimum=1)
        iterations = _check_int("iterations", self.iterations, minimum=0)
        seed = _check_seed(self.seed)
        if self.normalization not in _NORMALIZATIONS:
            raise ModelError(
                f"unknown normalization {self.normalization!r}: expected one of "
                f"{', '.join(_NORMALIZATIONS)}"
            )
        device = _resolve_device(self.device)
        if graph.adjacency.nnz == 0:
            raise ModelError("empty graph: it has no edges to propagate over")

        t0 = time.perf_counter()
        # Transition first: its temporaries are freed before the big embedding buffer exists.
        p = graph.transition(self.normalization)
        t1 = time.perf_counter()
        # The torch paths make the hashed init on their device from the keys alone (emb None).
        keys: np.ndarray | None = None
        emb: np.ndarray | None = None
        if device in ("cpu", "cuda") and self.init is None and iterations > 0:
            keys = _entity_keys(graph.node_ids, seed)
        else:
            emb = self._initial(graph, dim, seed)
        t2 = time.perf_counter()
        logger.info(
            "cleora: %d nodes, %d adjacency entries, dim %d, %d iterations on %s "
            "(transition %.2f s, init %.2f s)",
            graph.n_nodes,
            p.nnz,
            dim,
            iterations,
            device,
            t1 - t0,
            t2 - t1,
        )
        if iterations == 0:
            norms = np.linalg.norm(emb, axis=1, keepdims=True)
            np.divide(emb, np.maximum(norms, _EPS), out=emb)
        elif device == "scipy":
            emb = _propagate_scipy(p, emb, iterations, graph)
        else:
            emb = _propagate_torch(p, emb, iterations, device, keys=keys, dim=dim)
        self.embeddings_ = emb
        self.graph_ = graph
        self.device_ = device
        return self

    def _initial(self, graph: Hypergraph, dim: int, seed: int) -> np.ndarray:
        n = graph.n_nodes
        init = self.init
        if init is None:
            emb = np.empty((n, dim), dtype=np.float32)
            _hashed_init_into(_entity_keys(graph.node_ids, seed), emb)
            return emb
        if isinstance(init, Mapping):
            emb = np.zeros((n, dim), dtype=np.float32)
            index = {node_id: k for k, node_id in enumerate(graph.node_ids.tolist())}
            for key, vec in init.items():
                k = index.get(key)
                if k is None:
                    raise ModelError(
                        f"init has a vector for {key!r}, which is not a node of the graph "
                        f"(ids look like {graph.node_ids[0]!r})"
                    )
                v = np.asarray(vec, dtype=np.float32)
                if v.shape != (dim,):
                    raise ModelError(f"init[{key!r}] has shape {v.shape}, expected ({dim},)")
                emb[k] = v
            return emb
        arr = np.asarray(init)
        if arr.shape != (n, dim):
            raise ModelError(f"init has shape {arr.shape}, expected (n_nodes, dim) = ({n}, {dim})")
        if not np.all(np.isfinite(arr)):
            raise ModelError("init contains NaN or infinite values")
        return np.array(arr, dtype=np.float32, order="C", copy=True)

    def _check_fitted(self) -> None:
        if not hasattr(self, "embeddings_"):
            raise NotFittedError("this Cleora is not fitted yet: call fit(graph) first")

    def embeddings_for(self, node_type: str) -> tuple[np.ndarray, np.ndarray]:
        """Raw ids (n_type,) and vectors (n_type, dim) float32 of one node type.

        The vectors are a view into :attr:`embeddings_` (types are contiguous blocks).
        """
        self._check_fitted()
        raw, _ = self.graph_.nodes_of_type(node_type)
        return raw, self.embeddings_[self.graph_.type_slice(node_type)]

    def __repr__(self) -> str:
        return (
            f"Cleora(dim={self.dim}, iterations={self.iterations}, seed={self.seed}, "
            f"normalization={self.normalization!r}, device={self.device!r})"
        )
