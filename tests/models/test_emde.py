"""EMDE codebooks and sketch arithmetic (models/emde.py)."""

from __future__ import annotations

import io
import zipfile

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sketchstream.models.emde import Codebook, item_hash, normalize, sketch
from sketchstream.models.errors import ArtifactError, ModelError, NotFittedError

DEPTH, WIDTH = 6, 16


def _vectors(n: int = 300, dim: int = 16, seed: int = 0) -> tuple[np.ndarray, list[str]]:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, dim)).astype(np.float32), [f"item-{i}" for i in range(n)]


@pytest.fixture(scope="module")
def codebook() -> Codebook:
    x, ids = _vectors()
    return Codebook(depth=DEPTH, width=WIDTH, seed=0).fit(x, ids)


def test_codes_have_one_bucket_per_depth_within_width(codebook: Codebook) -> None:
    assert codebook.codes_.shape == (300, DEPTH)
    assert codebook.codes_.dtype == np.int16
    assert codebook.codes_.min() >= 0 and codebook.codes_.max() < WIDTH


def test_each_hyperplane_splits_the_data_evenly(codebook: Codebook) -> None:
    x, _ = _vectors()
    proj = np.einsum("nd,pkd->npk", x, codebook.planes_)
    above = (proj > codebook.offsets_[None]).mean(axis=0)
    assert np.allclose(above, 0.5, atol=1 / 300 + 1e-9)


def test_buckets_are_balanced_when_width_is_a_power_of_two(codebook: Codebook) -> None:
    counts = np.stack([np.bincount(codebook.codes_[:, d], minlength=WIDTH) for d in range(DEPTH)])
    assert counts.max() < 4 * 300 / WIDTH


def test_fit_is_seeded() -> None:
    x, ids = _vectors()
    a = Codebook(depth=DEPTH, width=WIDTH, seed=3).fit(x, ids)
    b = Codebook(depth=DEPTH, width=WIDTH, seed=3).fit(x, ids)
    c = Codebook(depth=DEPTH, width=WIDTH, seed=4).fit(x, ids)
    assert a.version == b.version and np.array_equal(a.codes_, b.codes_)
    assert c.version != a.version


def test_width_that_is_not_a_power_of_two_folds_codes_modulo_width() -> None:
    x, ids = _vectors()
    cb = Codebook(depth=3, width=10, seed=0).fit(x, ids)
    assert cb.codes_.max() < 10 and len(np.unique(cb.codes_[:, 0])) == 10


def test_encode_of_unknown_ids_gives_minus_one_rows(codebook: Codebook) -> None:
    out = codebook.encode(["item-3", "nope", "item-7"])
    assert out.shape == (3, DEPTH)
    assert np.array_equal(out[0], codebook.codes_[3])
    assert np.all(out[1] == -1)
    assert np.array_equal(out[2], codebook.codes_[7])


def test_rows_for_hashes_finds_items_by_stable_hash(codebook: Codebook) -> None:
    rows = codebook.rows_for_hashes(item_hash(["item-9", "nope", "item-0"]))
    assert rows.tolist() == [9, -1, 0]


def test_encode_vectors_agrees_with_fitted_codes(codebook: Codebook) -> None:
    x, _ = _vectors()
    assert np.array_equal(codebook.encode_vectors(x), codebook.codes_)


def test_fitted_codebook_is_immutable(codebook: Codebook) -> None:
    with pytest.raises(AttributeError):
        codebook.width = 3
    with pytest.raises(ValueError):
        codebook.codes_[0, 0] = 1
    with pytest.raises(ModelError):
        codebook.fit(*_vectors())


def test_unfitted_codebook_refuses_to_encode() -> None:
    with pytest.raises(NotFittedError):
        Codebook().encode(["a"])


def test_content_hash_changes_when_anything_changes() -> None:
    x, ids = _vectors()
    base = Codebook(depth=DEPTH, width=WIDTH, seed=0).fit(x, ids).version
    x2 = x.copy()
    x2[0, 0] += 1.0
    variants = [
        Codebook(depth=DEPTH + 1, width=WIDTH, seed=0).fit(x, ids),
        Codebook(depth=DEPTH, width=WIDTH // 2, seed=0).fit(x, ids),
        Codebook(depth=DEPTH, width=WIDTH, seed=1).fit(x, ids),
        Codebook(depth=DEPTH, width=WIDTH, seed=0).fit(x2, ids),
        Codebook(depth=DEPTH, width=WIDTH, seed=0).fit(x, [*ids[:-1], "renamed"]),
    ]
    versions = {v.version for v in variants}
    assert base.startswith("cb-") and base not in versions and len(versions) == len(variants)


def test_bytes_round_trip_keeps_content_and_version(codebook: Codebook) -> None:
    back = Codebook.from_bytes(codebook.to_bytes())
    assert back.version == codebook.version
    assert back.ids_ == codebook.ids_
    assert np.array_equal(back.codes_, codebook.codes_)
    assert np.array_equal(back.encode(["item-5"]), codebook.encode(["item-5"]))


def test_from_bytes_rejects_tampered_bytes(codebook: Codebook) -> None:
    data = bytearray(codebook.to_bytes())
    data[len(data) // 2] ^= 0xFF
    with pytest.raises(ArtifactError):
        Codebook.from_bytes(bytes(data))


def test_from_bytes_rejects_consistently_rewritten_arrays(codebook: Codebook) -> None:
    with np.load(io.BytesIO(codebook.to_bytes()), allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["codes"] = arrays["codes"].copy()
    arrays["codes"][0, 0] = (arrays["codes"][0, 0] + 1) % WIDTH
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    with pytest.raises(ArtifactError, match="altered"):
        Codebook.from_bytes(buf.getvalue())


def test_from_bytes_rejects_garbage() -> None:
    with pytest.raises(ArtifactError):
        Codebook.from_bytes(b"not a codebook")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("x.npy", b"junk")
    with pytest.raises(ArtifactError):
        Codebook.from_bytes(buf.getvalue())


codes_strategy = st.lists(
    st.lists(st.integers(-1, WIDTH - 1), min_size=DEPTH, max_size=DEPTH), max_size=20
)


@settings(max_examples=40, deadline=None)
@given(a=codes_strategy, b=codes_strategy)
def test_sketch_of_a_union_is_the_sum_of_sketches(a: list, b: list) -> None:
    ca = np.array(a, np.int64).reshape(-1, DEPTH)
    cb = np.array(b, np.int64).reshape(-1, DEPTH)
    union = sketch(np.concatenate([ca, cb]), width=WIDTH)
    assert np.array_equal(union, sketch(ca, width=WIDTH) + sketch(cb, width=WIDTH))


def test_sketch_is_a_weighted_sum_of_one_hots() -> None:
    codes = np.array([[0, 1], [0, 3], [-1, -1]])
    s = sketch(codes, np.array([2.0, 0.5, 9.0]), width=4)
    assert s.shape == (2, 4) and s.dtype == np.float32
    assert s.tolist() == [[2.5, 0, 0, 0], [0, 2.0, 0, 0.5]]


@settings(max_examples=30, deadline=None)
@given(st.lists(st.floats(0, 100, allow_nan=False), min_size=2 * 3 * WIDTH, max_size=2 * 3 * WIDTH))
def test_per_depth_normalization_gives_unit_l2_per_depth(values: list) -> None:
    s = np.array(values, np.float32).reshape(2, 3, WIDTH)
    s[0, 1] = 0.0  # an empty depth stays empty
    out = normalize(s)
    assert out.shape == s.shape and out.dtype == np.float32
    norms = np.linalg.norm(out.astype(np.float64), axis=-1)
    nonzero = np.abs(s).sum(axis=-1) > 0
    assert np.allclose(norms[nonzero], 1.0, atol=1e-5)
    assert np.all(norms[~nonzero] == 0)


def test_planted_communities_share_buckets_far_more_than_random_pairs() -> None:
    cleora = pytest.importorskip("sketchstream.models.cleora")
    rng = np.random.default_rng(0)
    n_comm, per_comm, n_users = 6, 40, 900
    items = np.arange(n_comm * per_comm)
    community = items // per_comm
    left, right = [], []
    for user in range(n_users):
        home = rng.integers(n_comm)
        for _ in range(12):
            c = home if rng.random() < 0.9 else rng.integers(n_comm)
            left.append(f"u{user}")
            right.append(f"i{rng.integers(per_comm) + c * per_comm}")
    graph = cleora.Hypergraph.from_edges(
        np.array(left), np.array(right), left_type="user", right_type="item"
    )
    ids, vecs = cleora.Cleora(dim=64, iterations=4, seed=0).fit(graph).embeddings_for("item")
    cb = Codebook(depth=16, width=16, seed=0).fit(vecs, [str(i) for i in ids])
    comm = np.array([int(str(i)[1:]) // per_comm for i in ids])
    codes = cb.codes_
    shared = (codes[:, None, :] == codes[None, :, :]).mean(axis=-1)  # (n, n)
    same = comm[:, None] == comm[None, :]
    off_diag = ~np.eye(len(ids), dtype=bool)
    p_same = shared[same & off_diag].mean()
    p_rand = shared[off_diag].mean()
    assert p_same > p_rand + 0.25, (p_same, p_rand)
    assert p_same > 2.5 * p_rand, (p_same, p_rand)
    assert len(np.unique(community)) == n_comm
