"""The catalogue's decoding and top-k: the sum of each item's level log-probabilities, and
the k best of them exactly as a stable sort of every score gives them, exclusions, candidate
filter and ties included."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sketchstream.models.catalogue import Catalogue
from sketchstream.models.emde import Codebook
from sketchstream.models.errors import ModelError
from sketchstream.models.events import Item

torch.set_num_threads(1)

N_ITEMS = 48


@pytest.fixture(scope="module")
def codebook() -> Codebook:
    """48 items in a depth-4, width-16 codebook."""
    ids = [f"i{k}" for k in range(N_ITEMS)]
    vectors = np.random.default_rng(0).normal(size=(N_ITEMS, 8)).astype("f4")
    return Codebook(depth=4, width=16, seed=0).fit(vectors, ids)


@pytest.fixture(scope="module")
def catalogue(codebook: Codebook) -> Catalogue:
    """The codebook's items, categories ``even`` and ``odd`` by their number."""
    cats = [Item(f"i{k}", categories=("even",) if k % 2 == 0 else ("odd",)) for k in range(N_ITEMS)]
    return Catalogue.from_codebooks({"interactions": codebook}, ["interactions"], cats)


def test_decoding_equals_a_loop_over_items_and_levels(
    catalogue: Catalogue, codebook: Codebook
) -> None:
    rng = np.random.default_rng(1)
    cb = codebook
    lp = np.log(rng.dirichlet(np.ones(16), size=(3, 4))).reshape(3, -1).astype(np.float32)
    got = catalogue.scores(lp)
    for b in range(3):
        for r, item in enumerate(catalogue.ids):
            code = cb.encode([item])[0]
            want = sum(lp[b, d * 16 + code[d]] for d in range(4))
            assert got[b, r] == pytest.approx(want, abs=1e-5)


def test_top_k_is_the_k_best_in_order(catalogue: Catalogue) -> None:
    lp = np.random.default_rng(2).normal(size=(2, 64)).astype(np.float32)
    ids, scores = catalogue.top_k(lp, k=5)
    full = catalogue.scores(lp)
    for b in range(2):
        best = np.argsort(-full[b], kind="stable")[:5]
        assert ids[b] == [catalogue.ids[c] for c in best]
        assert np.all(np.diff(scores[b]) <= 0)


def test_top_k_leaves_out_excluded_items_and_keeps_candidates(catalogue: Catalogue) -> None:
    lp = np.random.default_rng(3).normal(size=(1, 64)).astype(np.float32)
    best = catalogue.top_k(lp, k=3)[0][0]
    exclude = np.zeros((1, len(catalogue)), bool)
    exclude[0, [catalogue.ids.index(i) for i in best]] = True
    again = catalogue.top_k(lp, k=3, exclude=exclude)[0][0]
    assert not set(again) & set(best)
    even = catalogue.candidates(["even"])
    got = catalogue.top_k(lp, k=100, candidates=even)[0][0]
    assert sorted(got) == sorted(i for i in catalogue.ids if int(i[1:]) % 2 == 0)


def _stable_top_k(
    scores: np.ndarray, k: int, exclude: np.ndarray, candidates: np.ndarray
) -> list[tuple[list[int], np.ndarray]]:
    """The straightforward top-k: per row, a stable sort of every score, allowed items only."""
    out = []
    for b in range(len(scores)):
        s = np.where(exclude[b] | ~candidates, -np.inf, scores[b])
        rows = np.argsort(-s, kind="stable")
        rows = rows[np.isfinite(s[rows])][:k]
        out.append((rows.tolist(), s[rows]))
    return out


@pytest.mark.parametrize("block", [1 << 14, 700])  # one block of items, or 8 (the last short)
@pytest.mark.parametrize("k", [1, 10, 300])
@pytest.mark.parametrize(
    ("n_levels", "width"),
    [(3, 4), (6, 16)],  # 64 distinct scores for 5,000 items, or all distinct but for copies
)
def test_fast_top_k_equals_a_stable_sort_of_every_score_ties_and_exclusions_included(
    k: int, block: int, n_levels: int, width: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    import scipy.sparse as sp

    monkeypatch.setattr("sketchstream.models.catalogue._ITEM_BLOCK", block)
    rng = np.random.default_rng(k)
    n = 5000
    levels = rng.integers(0, width, (n, n_levels)) + np.arange(n_levels) * width
    levels[rng.choice(n, 500)] = levels[rng.choice(n, 500)]  # items that tie exactly
    cat = Catalogue([f"i{r}" for r in range(n)], levels, width)
    lp = rng.normal(size=(37, n_levels * width)).astype(np.float32)  # 37 rows: 3 decode chunks
    exclude = rng.random((37, n)) < 0.02
    exclude[5] = rng.random(n) < 0.999  # fewer than k items left for some k
    exclude[6] = True  # nothing left
    lp[8, :2] = -np.inf  # items in these buckets are never recommended to row 8
    lp[9, 1] = np.nan  # nor these to row 9 (a NaN once made the sampled threshold NaN)
    candidates = rng.random(n) < 0.9
    want = _stable_top_k(cat.scores(lp), k, exclude, candidates)
    for given in (exclude, sp.csr_matrix(exclude)):
        ids, scores = cat.top_k(lp, k, exclude=given, candidates=candidates)
        assert scores.dtype == np.float32
        for b, (rows, best) in enumerate(want):
            assert ids[b] == [cat.ids[r] for r in rows]
            assert np.array_equal(scores[b, : len(rows)], best)
            assert np.all(scores[b, len(rows) :] == -np.inf)
    assert ids[6] == [] and 0 < len(ids[5]) < 300  # k = 300: rows with fewer items left


def test_decoding_is_the_float32_sum_of_the_levels_in_level_order(catalogue: Catalogue) -> None:
    lp = np.random.default_rng(4).normal(size=(20, 64)).astype(np.float32)
    want = lp[:, catalogue.levels[:, 0]]
    for level in range(1, catalogue.levels.shape[1]):
        want = want + lp[:, catalogue.levels[:, level]]
    assert np.array_equal(catalogue.scores(lp), want)


def test_candidate_filter_without_categories_is_a_clear_error(codebook: Codebook) -> None:
    cat = Catalogue.from_codebooks({"interactions": codebook}, ["interactions"])
    with pytest.raises(ModelError, match="no item categories"):
        cat.candidates(["even"])
