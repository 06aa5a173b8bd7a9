"""Cleora and its Hypergraph, as specifications: one behaviour per test, small graphs."""

from __future__ import annotations

import hashlib
import subprocess
import sys

import numpy as np
import pytest
from sketchstream.models.cleora import Cleora, Hypergraph, hashed_init
from sketchstream.models.errors import ModelError, NotFittedError


def _random_edges(n_users: int, n_items: int, n_edges: int, seed: int) -> tuple[list, list]:
    """Seeded user -> item edges in which every user and every item occurs."""
    rng = np.random.default_rng(seed)
    users = np.concatenate([np.arange(n_users), rng.integers(0, n_users, n_edges)])
    items = np.concatenate([rng.integers(0, n_items, n_users), rng.integers(0, n_items, n_edges)])
    items[:n_items] = np.arange(n_items)
    return [f"u{u}" for u in users], [f"i{i}" for i in items]


@pytest.fixture
def make_graph():
    """Factory: a random user -> item graph (see ``_random_edges``)."""

    def make(n_users: int = 60, n_items: int = 25, n_edges: int = 400, seed: int = 0):
        users, items = _random_edges(n_users, n_items, n_edges, seed)
        return Hypergraph.from_edges(users, items, left_type="user", right_type="item")

    return make


def _topk_neighbours(x: np.ndarray, k: int) -> np.ndarray:
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    sims = x @ x.T
    np.fill_diagonal(sims, -np.inf)
    return np.argsort(-sims, axis=1, kind="stable")[:, :k]


def _overlap_at_k(a: np.ndarray, b: np.ndarray, k: int = 10) -> float:
    ta, tb = _topk_neighbours(a, k), _topk_neighbours(b, k)
    return float(np.mean([np.intersect1d(ra, rb).size / k for ra, rb in zip(ta, tb, strict=True)]))


# -- Hypergraph --------------------------------------------------------------------------------


def test_user_and_item_with_the_same_raw_id_are_different_nodes():
    g = Hypergraph.from_edges(["1", "2"], ["1", "1"], left_type="user", right_type="item")

    assert g.n_nodes == 3
    assert set(g.node_ids.tolist()) == {"user:1", "user:2", "item:1"}
    assert g.node_index("user", "1") != g.node_index("item", "1")


def test_nodes_of_type_returns_raw_ids_and_their_node_indices():
    g = Hypergraph.from_edges([7, 7, 8], [1, 2, 2], left_type="user", right_type="item")

    raw, idx = g.nodes_of_type("item")

    assert sorted(raw.tolist()) == [1, 2]
    assert [g.node_ids[i] for i in idx] == [f"item:{r}" for r in raw]


def test_hyperedges_are_star_expanded_like_the_equivalent_edge_list():
    g1 = Hypergraph.from_hyperedges([("m1", ["a", "b"]), ("m2", ["b"])], "item", "token")
    g2 = Hypergraph.from_edges(["m1", "m1", "m2"], ["a", "b", "b"], None, "item", "token")

    assert g1.node_ids.tolist() == g2.node_ids.tolist()
    assert (g1.adjacency != g2.adjacency).nnz == 0


def test_duplicate_edges_add_their_weights():
    g = Hypergraph.from_edges(["u", "u"], ["i", "i"], weights=[1.0, 2.5])

    assert g.adjacency[g.node_index("user", "u"), g.node_index("item", "i")] == pytest.approx(3.5)


def test_left_transition_rows_sum_to_one(make_graph):
    p = make_graph().transition("left")

    assert p.dtype == np.float32
    np.testing.assert_allclose(p.sum(axis=1), 1.0, rtol=1e-6)


def test_symmetric_transition_is_symmetric_degree_normalized(make_graph):
    g = make_graph()
    a = g.adjacency.toarray().astype(np.float64)
    inv_sqrt = 1.0 / np.sqrt(a.sum(axis=1))

    p = g.transition("symmetric").toarray()

    np.testing.assert_allclose(p, p.T, atol=1e-7)
    np.testing.assert_allclose(p, inv_sqrt[:, None] * a * inv_sqrt[None, :], rtol=1e-6)


def test_one_type_graph_merges_left_and_right_ids():
    g = Hypergraph.from_edges(["a", "b"], ["b", "c"], left_type="item", right_type="item")

    assert g.types == ("item",)
    assert sorted(g.node_ids.tolist()) == ["item:a", "item:b", "item:c"]


# -- deterministic initialization -------------------------------------------------------------


def test_hashed_init_depends_only_on_the_id_not_on_the_other_ids():
    alone = hashed_init(["item:7"], dim=16, seed=3)
    among = hashed_init(["user:1", "item:7", "item:100000"], dim=16, seed=3)

    assert alone.tobytes() == among[1].tobytes()


def test_hashed_init_differs_between_seeds_and_ids():
    x = hashed_init(["user:1", "item:1"], dim=64, seed=0)
    y = hashed_init(["user:1"], dim=64, seed=1)

    assert not np.array_equal(x[0], x[1])
    assert not np.array_equal(x[0], y[0])
    assert x.dtype == np.float32 and np.all(np.abs(x) <= 1.0)


_GOLDEN_CODE = (
    "import sys; from sketchstream.models.cleora import hashed_init; "
    "sys.stdout.buffer.write(hashed_init(['user:42', 'item:42', 'tok:é'], 33, 5).tobytes())"
)


def test_hashed_init_is_bit_identical_in_another_process():
    here = hashed_init(["user:42", "item:42", "tok:é"], 33, 5).tobytes()

    there = subprocess.run(
        [sys.executable, "-c", _GOLDEN_CODE], check=True, capture_output=True
    ).stdout

    assert there == here


def test_hashed_init_bits_are_pinned():
    # Pinned so that a refactor can never silently change every embedding's starting point.
    got = hashlib.sha256(hashed_init(["user:42", "item:42", "tok:é"], 33, 5).tobytes())
    assert got.hexdigest()[:16] == "00ec212d4808baa1"


# -- Cleora -----------------------------------------------------------------------------------


def test_embeddings_rows_have_unit_norm(make_graph):
    model = Cleora(dim=16, iterations=3).fit(make_graph())

    assert model.embeddings_.shape == (model.graph_.n_nodes, 16)
    assert model.embeddings_.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(model.embeddings_, axis=1), 1.0, rtol=1e-5)


def test_fit_is_deterministic_and_seeded(make_graph):
    g = make_graph()

    a = Cleora(dim=16, seed=1).fit(g).embeddings_
    b = Cleora(dim=16, seed=1).fit(g).embeddings_
    c = Cleora(dim=16, seed=2).fit(g).embeddings_

    assert a.tobytes() == b.tobytes()
    assert not np.allclose(a, c)


def test_embeddings_for_returns_one_types_ids_and_vectors(make_graph):
    g = make_graph()
    model = Cleora(dim=8).fit(g)

    raw, vecs = model.embeddings_for("item")

    assert vecs.shape == (raw.shape[0], 8)
    np.testing.assert_array_equal(vecs[0], model.embeddings_[g.node_index("item", raw[0])])


def test_one_hot_init_propagates_labels_to_neighbours():
    # u1 touches only label-0 items, u2 only label-1 items; item c is unlabelled.
    g = Hypergraph.from_edges(["u1", "u1", "u2", "u2"], ["a", "c", "b", "b"])
    init = {"item:a": [1.0, 0.0], "item:b": [0.0, 1.0]}

    emb = Cleora(dim=2, iterations=1, init=init).fit(g).embeddings_

    assert np.argmax(emb[g.node_index("user", "u1")]) == 0
    assert np.argmax(emb[g.node_index("user", "u2")]) == 1


def test_caller_given_array_init_is_used(make_graph):
    g = make_graph()
    init = np.ones((g.n_nodes, 4), dtype=np.float32)

    emb = Cleora(dim=4, iterations=2, init=init).fit(g).embeddings_

    # Propagating identical rows leaves every row the same unit vector.
    np.testing.assert_allclose(emb, 0.5, rtol=1e-6)


@pytest.mark.parametrize("normalization", ["left", "symmetric"])
def test_torch_cpu_path_equals_scipy_path(make_graph, normalization):
    g = make_graph()

    ref = Cleora(dim=32, iterations=4, normalization=normalization, device="scipy").fit(g)
    got = Cleora(dim=32, iterations=4, normalization=normalization, device="cpu").fit(g)

    assert ref.device_ == "scipy" and got.device_ == "cpu"
    assert np.abs(ref.embeddings_ - got.embeddings_).max() <= 1e-4


@pytest.mark.parametrize("dim", [1, 7, 128])
def test_torch_made_init_is_hashed_init_bit_for_bit(dim):
    from sketchstream.models.cleora import _entity_keys, _hashed_init_torch

    ids = np.array([f"user:{k}" for k in range(500)] + ["item:é", "item:" + "x" * 300])
    seed = 2**64 - 5  # keys with the top bit set: the int64 view is negative

    got = _hashed_init_torch(_entity_keys(ids, seed), dim, "cpu").numpy()

    assert got.view(np.uint32).tobytes() == hashed_init(ids, dim, seed).view(np.uint32).tobytes()


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


@pytest.mark.skipif(not _cuda_available(), reason="torch sees no CUDA GPU")
@pytest.mark.parametrize("normalization", ["left", "symmetric"])
def test_cuda_path_equals_scipy_path(make_graph, normalization):
    # CI has no GPU: this runs where one is (the M-graph figures are in the README).
    g = make_graph(n_users=3000, n_items=400, n_edges=40000)

    ref = Cleora(dim=64, iterations=4, normalization=normalization, device="scipy").fit(g)
    got = Cleora(dim=64, iterations=4, normalization=normalization, device="cuda").fit(g)

    assert got.device_ == "cuda" and got.embeddings_.dtype == np.float32
    assert np.abs(ref.embeddings_ - got.embeddings_).max() <= 1e-4


def test_torch_cpu_path_equals_scipy_path_on_a_one_type_graph():
    rng = np.random.default_rng(1)
    g = Hypergraph.from_edges(rng.integers(0, 40, 300), rng.integers(0, 40, 300), None, "i", "i")

    ref = Cleora(dim=16, device="scipy").fit(g).embeddings_
    got = Cleora(dim=16, device="cpu").fit(g).embeddings_

    assert np.abs(ref - got).max() <= 1e-4


def test_hub_node_with_more_edges_than_one_task_matches_torch_path():
    # The scipy path splits a row with very many edges into pieces summed afterwards.
    users, items = _random_edges(n_users=6000, n_items=30, n_edges=2000, seed=2)
    users += [f"u{u}" for u in range(6000)]
    items += ["hub"] * 6000
    g = Hypergraph.from_edges(users, items)

    ref = Cleora(dim=8, device="cpu").fit(g).embeddings_
    got = Cleora(dim=8, device="scipy").fit(g).embeddings_

    assert np.abs(ref - got).max() <= 1e-4


def test_matches_pycleora_plain_propagation():
    pycleora = pytest.importorskip("pycleora")
    users, items = _random_edges(n_users=300, n_items=120, n_edges=4000, seed=5)
    g = Hypergraph.from_edges(users, items, left_type="user", right_type="item")
    dim, iterations = 64, 4
    ours = Cleora(dim=dim, iterations=iterations, seed=0).fit(g)
    # Raw ids "u.." / "i.." never collide, so pycleora's un-namespaced ids are fine here.
    ref_graph = pycleora.SparseMatrix.from_iterator(
        (f"{u}\t{i}" for u, i in zip(users, items, strict=True)), "user item"
    )
    # Both start from the same vectors: ours, reordered to pycleora's entity order.
    start = hashed_init(g.node_ids, dim, seed=0)
    our_index = {n.split(":", 1)[1]: k for k, n in enumerate(g.node_ids.tolist())}
    ref = pycleora.embed(
        ref_graph,
        feature_dim=dim,
        num_iterations=iterations,
        propagation="left",
        initial_embeddings=start[[our_index[e] for e in ref_graph.entity_ids]],
        whiten=False,
    )

    raw_items, our_items = ours.embeddings_for("item")
    ref_items = ref[ref_graph.get_entity_indices([str(r) for r in raw_items])]
    assert _overlap_at_k(our_items, ref_items, k=10) >= 0.99


# -- bad input --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("build", "needle"),
    [
        (lambda: Hypergraph.from_edges([], []), "empty graph"),
        (lambda: Hypergraph.from_edges(["a", "b"], ["x"]), "(2,)"),
        (lambda: Hypergraph.from_hyperedges([]), "empty graph"),
        (lambda: Hypergraph.from_edges(["a"], ["x"], weights=[-1.0]), "-1.0"),
        (lambda: Hypergraph.from_arrays([0, 5], [0, 0], 2, 1), "[0, 5]"),
    ],
)
def test_bad_graph_input_raises_model_error_naming_the_value(build, needle):
    with pytest.raises(ModelError, match=None) as err:
        build()
    assert needle in str(err.value)


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"dim": 0}, "dim must be >= 1, got 0"),
        ({"iterations": -1}, "iterations must be >= 0, got -1"),
        ({"normalization": "right"}, "'right'"),
        ({"device": "tpu"}, "'tpu'"),
        ({"init": np.zeros((3, 4))}, "(3, 4)"),
        ({"init": {"user:nobody": [1.0] * 128}}, "'user:nobody'"),
    ],
)
def test_bad_estimator_settings_raise_model_error_naming_the_value(make_graph, kwargs, needle):
    with pytest.raises(ModelError) as err:
        Cleora(**kwargs).fit(make_graph())
    assert needle in str(err.value)


def test_embeddings_for_before_fit_raises_not_fitted():
    with pytest.raises(NotFittedError):
        Cleora().embeddings_for("item")
