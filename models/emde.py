"""EMDE: density-aware partitionings of an embedding space, and sketch arithmetic.

A :class:`Codebook` holds ``depth`` independent partitionings of the item embeddings. Each
partitioning cuts the space with ``n_planes`` random hyperplanes whose offsets sit at the
median of the data's projections, so every hyperplane splits the items evenly and the cells
are small where items are dense (the density-aware partitioning of the EMDE paper). An item's
bucket in a partitioning is its ``n_planes``-bit code, folded modulo ``width``.

A sketch of a weighted set of items is the sum of the items' one-hot buckets, one histogram per
depth: ``(depth, width)``. Sketches add (``sketch(A ∪ B) = sketch(A) + sketch(B)``) and are
L2-normalized per depth before they go into a model (:func:`normalize`).

A fitted codebook is an immutable value named by the hash of its content (:attr:`version`); it
round-trips through :meth:`Codebook.to_bytes` / :meth:`Codebook.from_bytes` without pickle.

    cb = Codebook(depth=12, width=64, seed=0).fit(vectors, ids)
    codes = cb.encode(["item-1", "item-2"])         # (2, 12) int16, -1 for unknown ids
    s = normalize(sketch(codes, width=cb.width))    # (12, 64) float32
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import zipfile
import zlib
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
from sketchstream.models import kernels
from sketchstream.models.errors import ArtifactError, ModelError, NotFittedError

__all__ = [
    "Codebook",
    "item_hash",
    "normalize",
    "sketch",
]

_FORMAT = "sketchstream.codebook"
_FORMAT_VERSION = 1


def item_hash(ids: Iterable[str]) -> np.ndarray:
    """Stable 64-bit hashes of item ids (BLAKE2b-64 of the UTF-8 bytes): ``(n,)`` uint64.

    The same id hashes the same on every machine and in every process, so a hash can name an
    item in a serialized user state and be looked up in any later codebook.
    """
    out = [
        int.from_bytes(hashlib.blake2b(str(i).encode(), digest_size=8).digest(), "little")
        for i in ids
    ]
    return np.array(out, dtype=np.uint64)


def sketch(codes: np.ndarray, weights: np.ndarray | None = None, *, width: int) -> np.ndarray:
    """Sum of the one-hot buckets of a weighted item set: ``(depth, width)`` float32.

    ``codes (n, depth)``: bucket per depth (rows of ``-1``, unknown items, add nothing).
    ``weights (n,)``: weight per item (default 1).
    """
    codes = np.asarray(codes)
    if codes.ndim != 2:
        raise ModelError(f"sketch: codes must be (n, depth), got shape {codes.shape}")
    n, depth = codes.shape
    if width < 1:
        raise ModelError(f"sketch: width must be >= 1, got {width}")
    if codes.size and (codes.max() >= width or codes.min() < -1):
        raise ModelError(
            f"sketch: codes must lie in [-1, {width}), got [{codes.min()}, {codes.max()}]"
        )
    w = np.ones(n, np.float64) if weights is None else np.asarray(weights, np.float64)
    if w.shape != (n,):
        raise ModelError(f"sketch: weights shape {w.shape}, expected ({n},)")
    known = codes >= 0
    flat = (np.arange(depth) * width)[None, :] + codes
    out = np.bincount(
        flat[known],
        weights=np.broadcast_to(w[:, None], codes.shape)[known],
        minlength=depth * width,
    )
    return out.reshape(depth, width).astype(np.float32)


def normalize(sk: np.ndarray) -> np.ndarray:
    """Per-depth L2-normalized copy of sketches ``(..., depth, width)``; shape and dtype kept.

    All-zero rows (an empty sketch at that depth) stay zero.
    """
    sk = np.asarray(sk)
    if sk.ndim < 2:
        raise ModelError(f"normalize: expected (..., depth, width), got shape {sk.shape}")
    if sk.dtype == np.float32 and kernels.ENABLED and sk.size:  # compiled: ~6x
        out = np.empty(sk.shape, np.float32)
        w = sk.shape[-1]
        kernels.l2_rows(np.ascontiguousarray(sk).reshape(-1, w), out.reshape(-1, w))
        return out
    norm = np.sqrt(np.sum(np.square(sk, dtype=np.float64), axis=-1, keepdims=True))
    out = np.divide(sk, norm, out=np.zeros(sk.shape, np.float64), where=norm > 0)
    return out.astype(sk.dtype if np.issubdtype(sk.dtype, np.floating) else np.float32)


def _readonly(a: np.ndarray) -> np.ndarray:
    a = np.ascontiguousarray(a)
    a.flags.writeable = False
    return a


def _ids_blob(ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Item ids as one UTF-8 blob ``(total,) uint8`` and their byte lengths ``(n,) uint32``."""
    encoded = [i.encode() for i in ids]
    lengths = np.fromiter((len(e) for e in encoded), np.uint32, len(encoded))
    return np.frombuffer(b"".join(encoded), np.uint8), lengths


class Codebook:
    """EMDE codebook: ``depth`` density-aware partitionings of ``width`` buckets each.

    Parameters
    ----------
    depth: number of independent partitionings (N in the paper).
    width: buckets per partitioning (W); a code is the ``n_planes``-bit cell index modulo W.
    seed: seed of the hyperplane directions (``np.random.default_rng(seed)``).
    n_planes: hyperplanes per partitioning (K); default ``ceil(log2(width))``.

    Learned attributes (read-only after :meth:`fit`; the object is then frozen):
    ``planes_ (depth, n_planes, dim)`` float32 unit normals, ``offsets_ (depth, n_planes)``
    float32 median projections, ``ids_`` tuple of item ids, ``codes_ (n_items, depth)`` int16,
    ``hashes_ (n_items,)`` uint64 :func:`item_hash` of the ids, :attr:`version` content hash.
    """

    def __init__(
        self, depth: int = 12, width: int = 64, seed: int | None = 0, n_planes: int | None = None
    ) -> None:
        self.depth = depth
        self.width = width
        self.seed = seed
        self.n_planes = n_planes

    # -- immutability -------------------------------------------------------------------------

    def __setattr__(self, name: str, value: Any) -> None:
        if self.__dict__.get("_frozen", False):
            raise AttributeError(
                f"Codebook {self.__dict__.get('version')} is immutable after fit: "
                f"cannot set {name!r}; fit a new Codebook instead"
            )
        super().__setattr__(name, value)

    def __repr__(self) -> str:
        fitted = f", version={self.version!r}, n_items={len(self.ids_)}" if self._fitted() else ""
        return (
            f"Codebook(depth={self.depth}, width={self.width}, seed={self.seed}, "
            f"n_planes={self.n_planes}{fitted})"
        )

    def _fitted(self) -> bool:
        return self.__dict__.get("_frozen", False)

    def _check_fitted(self) -> None:
        if not self._fitted():
            raise NotFittedError("Codebook is not fitted: call fit(vectors, ids) first")

    def _bits(self) -> int:
        if self.n_planes is not None:
            return int(self.n_planes)
        return max(1, math.ceil(math.log2(self.width)))

    # -- fit ----------------------------------------------------------------------------------

    def fit(self, vectors: np.ndarray, ids: Sequence[str]) -> Codebook:
        """Fit the partitionings on item embeddings ``vectors (n, dim)`` named by ``ids (n,)``.

        Returns ``self``, frozen. Ids must be unique strings.
        """
        if self._fitted():
            raise ModelError("Codebook is already fitted and immutable; fit a new Codebook")
        if not (isinstance(self.depth, int) and self.depth >= 1):
            raise ModelError(f"Codebook: depth must be an int >= 1, got {self.depth!r}")
        if not (isinstance(self.width, int) and 2 <= self.width <= 32767):
            raise ModelError(f"Codebook: width must be an int in [2, 32767], got {self.width!r}")
        bits = self._bits()
        if not 1 <= bits <= 30:
            raise ModelError(f"Codebook: n_planes must be in [1, 30], got {bits}")
        x = np.asarray(vectors, dtype=np.float32)
        if x.ndim != 2 or x.shape[0] < 2 or x.shape[1] < 1:
            raise ModelError(f"Codebook.fit: vectors must be (n >= 2, dim >= 1), got {x.shape}")
        if not np.all(np.isfinite(x)):
            raise ModelError("Codebook.fit: vectors contain nan or inf")
        id_list = [str(i) for i in ids]
        if len(id_list) != x.shape[0]:
            raise ModelError(f"Codebook.fit: {len(id_list)} ids for {x.shape[0]} vectors")
        if len(set(id_list)) != len(id_list):
            raise ModelError("Codebook.fit: item ids must be unique")
        dim = x.shape[1]
        rng = np.random.default_rng(self.seed)
        planes = rng.standard_normal((self.depth, bits, dim))
        planes /= np.linalg.norm(planes, axis=-1, keepdims=True)
        planes = planes.astype(np.float32)
        proj = x @ planes.reshape(-1, dim).T  # (n, depth * bits)
        # The median of each projection: every hyperplane splits the items in half, so cells
        # shrink where items crowd together (density-aware partitioning).
        offsets = np.median(proj, axis=0).astype(np.float32).reshape(self.depth, bits)
        self._set_learned(planes, offsets, id_list, self._codes_of(proj, offsets))
        return self

    def _set_learned(
        self, planes: np.ndarray, offsets: np.ndarray, ids: list[str], codes: np.ndarray
    ) -> None:
        hashes = item_hash(ids)
        order = np.argsort(hashes, kind="stable")
        if np.any(hashes[order][1:] == hashes[order][:-1]):
            raise ModelError("Codebook: two item ids share a 64-bit hash; rename one of them")
        self.planes_ = _readonly(planes)
        self.offsets_ = _readonly(offsets)
        self.ids_ = tuple(ids)
        self.codes_ = _readonly(codes.astype(np.int16))
        self.hashes_ = _readonly(hashes)
        self._row_of = {i: k for k, i in enumerate(ids)}
        self._hash_order = _readonly(order)
        self._sorted_hashes = _readonly(hashes[order])
        self.version = self._content_hash()
        self._frozen = True

    def _codes_of(self, proj: np.ndarray, offsets: np.ndarray) -> np.ndarray:
        """Bucket codes ``(n, depth)`` int16 from projections ``(n, depth * bits)``."""
        n = proj.shape[0]
        bits = offsets.shape[1]
        above = (proj > offsets.reshape(1, -1)).reshape(n, self.depth, bits)
        code = above.astype(np.int64) @ (np.int64(1) << np.arange(bits, dtype=np.int64))
        return (code % self.width).astype(np.int16)

    def _header(self) -> dict[str, Any]:
        return {
            "format": _FORMAT,
            "format_version": _FORMAT_VERSION,
            "depth": self.depth,
            "width": self.width,
            "n_planes": self._bits(),
            "seed": self.seed,
            "dim": int(self.planes_.shape[-1]),
            "n_items": len(self.ids_),
        }

    def _content_hash(self) -> str:
        h = hashlib.sha256()
        h.update(json.dumps(self._header(), sort_keys=True).encode())
        blob, lengths = _ids_blob(self.ids_)
        for a in (self.planes_, self.offsets_, lengths, blob, self.codes_):
            h.update(np.ascontiguousarray(a).view(np.uint8).tobytes())
        return "cb-" + h.hexdigest()[:16]

    # -- encode -------------------------------------------------------------------------------

    @property
    def n_items(self) -> int:
        """Number of items the codebook knows."""
        self._check_fitted()
        return len(self.ids_)

    def rows(self, ids: Iterable[str]) -> np.ndarray:
        """Row of each id in :attr:`codes_`: ``(n,)`` int64, ``-1`` for unknown ids."""
        self._check_fitted()
        get = self._row_of.get
        ids = list(ids)
        return np.fromiter((get(i, -1) for i in ids), np.int64, len(ids))

    def rows_for_hashes(self, hashes: np.ndarray) -> np.ndarray:
        """Row of each :func:`item_hash` value: ``(n,)`` int64, ``-1`` for unknown hashes."""
        self._check_fitted()
        h = np.asarray(hashes, dtype=np.uint64)
        pos = np.searchsorted(self._sorted_hashes, h)
        pos = np.minimum(pos, len(self._sorted_hashes) - 1)
        found = self._sorted_hashes[pos] == h
        return np.where(found, self._hash_order[pos], -1).astype(np.int64)

    def encode(self, ids: Iterable[str]) -> np.ndarray:
        """Buckets of items by id: ``(n, depth)`` int16; rows of ``-1`` for unknown ids."""
        return self._codes_at(self.rows(ids))

    def _codes_at(self, rows: np.ndarray) -> np.ndarray:
        out = self.codes_[np.maximum(rows, 0)]
        out[rows < 0] = -1
        return out

    def encode_vectors(self, vectors: np.ndarray) -> np.ndarray:
        """Buckets of new embeddings ``(n, dim)``: ``(n, depth)`` int16."""
        self._check_fitted()
        x = np.asarray(vectors, dtype=np.float32)
        dim = self.planes_.shape[-1]
        if x.ndim != 2 or x.shape[1] != dim:
            raise ModelError(f"encode_vectors: expected (n, {dim}), got shape {x.shape}")
        return self._codes_of(x @ self.planes_.reshape(-1, dim).T, self.offsets_)

    # -- bytes --------------------------------------------------------------------------------

    def to_bytes(self) -> bytes:
        """Compact, versioned bytes (an npz of plain arrays and a JSON header; no pickle)."""
        self._check_fitted()
        header = dict(self._header(), version=self.version)
        blob, lengths = _ids_blob(self.ids_)
        buf = io.BytesIO()
        np.savez_compressed(
            buf,
            header=np.frombuffer(json.dumps(header, sort_keys=True).encode(), np.uint8),
            planes=self.planes_,
            offsets=self.offsets_,
            id_lengths=lengths,
            id_blob=blob,
            codes=self.codes_,
        )
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> Codebook:
        """Load :meth:`to_bytes` output; raises ArtifactError if unreadable or tampered with."""
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
            header = json.loads(arrays.pop("header").tobytes().decode())
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, zlib.error) as e:
            raise ArtifactError(f"codebook bytes are unreadable: {e}") from e
        if header.get("format") != _FORMAT or header.get("format_version") != _FORMAT_VERSION:
            raise ArtifactError(
                f"not a codebook of format {_FORMAT} v{_FORMAT_VERSION}: header {header!r}"
            )
        try:
            blob = arrays["id_blob"].tobytes()
            ends = np.cumsum(arrays["id_lengths"].astype(np.int64))
            starts = ends - arrays["id_lengths"]
            ids = [blob[s:e].decode() for s, e in zip(starts.tolist(), ends.tolist(), strict=True)]
            cb = cls(
                depth=int(header["depth"]),
                width=int(header["width"]),
                seed=header["seed"],
                n_planes=int(header["n_planes"]),
            )
            planes = arrays["planes"].astype(np.float32, copy=False)
            offsets = arrays["offsets"].astype(np.float32, copy=False)
            codes = arrays["codes"].astype(np.int16, copy=False)
            shapes_ok = (
                planes.shape == (cb.depth, cb.n_planes, header["dim"])
                and offsets.shape == (cb.depth, cb.n_planes)
                and codes.shape == (len(ids), cb.depth)
                and len(ids) == header["n_items"]
            )
            if not shapes_ok:
                raise ArtifactError(f"codebook arrays do not match header {header!r}")
            cb._set_learned(planes, offsets, ids, codes)
        except (KeyError, ValueError, UnicodeDecodeError, ModelError) as e:
            raise ArtifactError(f"codebook bytes are inconsistent: {e}") from e
        if cb.version != header.get("version"):
            raise ArtifactError(
                f"codebook content hash {cb.version} does not match its name "
                f"{header.get('version')!r}: the bytes were altered"
            )
        return cb
