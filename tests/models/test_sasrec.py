"""SASRec, the sequential anchor: windows, causality, determinism, learning a sequence."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sketchstream.models.errors import ModelError
from sketchstream.models.sasrec import SASRec, SASRecConfig, fit_sasrec, training_windows

torch.set_num_threads(1)


def test_windows_make_every_item_after_the_first_a_target_once() -> None:
    seqs = [np.arange(7), np.array([3]), np.array([5, -1, 6])]
    w = training_windows(seqs, max_len=3)
    # a position is trained when both its input and its target are items (not padding)
    pairs = [(int(r[k]), int(r[k + 1])) for r in w for k in range(3) if min(r[k], r[k + 1]) >= 0]
    assert sorted(t for _, t in pairs) == [1, 2, 3, 4, 5, 6, 6]
    assert (5, 6) in pairs  # the -1 (outside the catalogue) is dropped from the sequence
    assert w.shape[1] == 4


def test_an_output_position_never_reads_later_items() -> None:
    torch.manual_seed(0)
    model = SASRec(20, SASRecConfig(max_len=6, dim=8, dropout=0.0)).eval()
    a = torch.tensor([[-1, 1, 2, 3, 4, 5]])
    b = torch.tensor([[-1, 1, 2, 3, 9, 9]])
    with torch.no_grad():
        ha, hb = model(a), model(b)
    assert torch.allclose(ha[:, :4], hb[:, :4], atol=1e-6)
    assert not torch.allclose(ha[:, 4:], hb[:, 4:])


def test_too_long_a_sequence_is_a_clear_error() -> None:
    model = SASRec(5, SASRecConfig(max_len=3, dim=8))
    with pytest.raises(ModelError, match="max_len"):
        model(torch.zeros((1, 4), dtype=torch.long))


def _cycles(n_items: int = 30, n_users: int = 60, length: int = 25, seed: int = 0):
    rng = np.random.default_rng(seed)
    return [(rng.integers(n_items) + np.arange(length)) % n_items for _ in range(n_users)]


def _fit(seed: int, epochs: int = 2):
    seqs = _cycles()
    last = np.stack([s[-9:-1] for s in seqs])
    target = np.array([s[-1] for s in seqs])
    train = [s[:-1] for s in seqs]
    cfg = SASRecConfig(max_len=8, dim=16, blocks=1, epochs=epochs, lr=5e-3, seed=seed)
    model, history = fit_sasrec(train, last, target, 30, cfg)
    return model, history, last, target


def test_training_is_deterministic_given_a_seed() -> None:
    a, _, last, _ = _fit(0)
    b, _, _, _ = _fit(0)
    c, _, _, _ = _fit(1)
    assert np.array_equal(a.scores(last), b.scores(last))
    assert not np.array_equal(a.scores(last), c.scores(last))


def test_it_learns_a_predictable_sequence() -> None:
    model, history, last, target = _fit(0, epochs=25)
    top = np.argsort(-model.scores(last), axis=1)[:, :3]
    hit = (top == target[:, None]).any(axis=1).mean()
    assert hit > 0.8  # chance: 3 / 30
    assert history[-1]["val_ndcg@10"] > 0.5
