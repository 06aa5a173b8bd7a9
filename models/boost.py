"""Gradient-boosted trees on the MLP's own dense inputs, blended with some of its heads.

The return head asks "will this user have another event within H": a question about the
user's counts and gaps, which trees split well and the MLP's smooth layers fit less sharply.
On the four data sets (README, Training) LightGBM on the very columns the MLP reads, its
logit averaged with the MLP's, put the return head ahead of the counts-and-recency GBDT
baseline where the MLP alone was behind it.

:func:`fit_boost` fits one booster a head on the training rows, early-stopped on validation,
then picks the blend weight ``w`` (the booster's share of the logit, 0, 0.1, ..., 1) on
validation AUC: ``w = 0`` keeps the MLP alone and drops the booster, so a data set where the
trees add nothing serves the MLP as before. :class:`HeadBoost` is what the model carries:
:meth:`~sketchstream.models.mlp.EngagementMLP.predict` blends with it, so the trainer, the
worker, its helper process, ``evaluate`` and the refresh job all score through the same
code. Boosters are kept as LightGBM's own text format (no pickle) and predict on one thread,
deterministic.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from sketchstream.models.errors import ModelError

__all__ = ["BOOST_HEADS", "BoostedHead", "HeadBoost", "boost_heads", "fit_boost"]

log = logging.getLogger(__name__)

#: ``TrainConfig.boost``: which heads get a booster. "return": the return heads (a horizon),
#: "all": every head, "off": none
BOOST_HEADS = ("return", "all", "off")

#: the booster's share of the blended logit, chosen on validation AUC among these
WEIGHTS = tuple(round(0.1 * k, 1) for k in range(11))

#: LightGBM's settings: those the four data sets were first measured with (README, Training),
#: with small trees, at most ``MAX_ROUNDS`` of them, to bound the cost a row in the worker (its
#: helper scores every event); early stopping on validation ends sooner
PARAMS = {
    "objective": "binary",
    "learning_rate": 0.05,
    "num_leaves": 15,
    "min_data_in_leaf": 200,
    "max_bin": 63,
    "feature_fraction": 0.8,
    "bagging_fraction": 0.5,
    "bagging_freq": 1,
    "deterministic": True,
    "force_row_wise": True,
    "verbose": -1,
}
MAX_ROUNDS = 100
EARLY_STOP = 50


@dataclass(frozen=True, eq=False)
class BoostedHead:
    """One head's booster: ``column`` of the model's heads, ``weight`` its share of the
    blended logit, ``model`` LightGBM's text form, ``rounds`` its trees."""

    head: str
    column: int
    weight: float
    model: str
    rounds: int

    def __post_init__(self) -> None:
        if not 0.0 < self.weight <= 1.0:
            raise ModelError(f"boost of head {self.head!r}: weight {self.weight} not in (0, 1]")


class HeadBoost:
    """The boosters of a model's heads, applied to its logits (:meth:`blend`)."""

    def __init__(self, heads: Sequence[BoostedHead], n_dense: int) -> None:
        import lightgbm as lgb

        self.heads = tuple(heads)
        self.n_dense = n_dense
        self._boosters = []
        for h in self.heads:
            try:
                booster = lgb.Booster(model_str=h.model)
            except lgb.basic.LightGBMError as exc:
                raise ModelError(f"boost of head {h.head!r}: unreadable booster: {exc}") from exc
            if booster.num_feature() != n_dense:
                raise ModelError(
                    f"boost of head {h.head!r}: its booster reads {booster.num_feature()} "
                    f"columns, the model's dense block has {n_dense}"
                )
            self._boosters.append(booster)

    def blend(self, dense: np.ndarray, logits: np.ndarray) -> None:
        """``logits (n, heads)``, in place: each boosted head's column becomes
        ``(1 - w) * its logit + w * the booster's raw score`` on ``dense (n, n_dense)``."""
        if not len(dense):
            return
        for h, booster in zip(self.heads, self._boosters, strict=True):
            raw = booster.predict(dense, raw_score=True, num_threads=1)
            column = logits[:, h.column]
            column *= 1.0 - h.weight
            column += h.weight * raw

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (the boosters' text inside): the artifact's file, the helper's
        message."""
        return {
            "n_dense": self.n_dense,
            "heads": [
                {
                    "head": h.head,
                    "column": h.column,
                    "weight": h.weight,
                    "rounds": h.rounds,
                    "model": h.model,
                }
                for h in self.heads
            ],
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], heads: Sequence[str]) -> HeadBoost:
        """Inverse of :meth:`to_dict`, checked against the model's ``heads``."""
        try:
            parts = [
                BoostedHead(
                    str(h["head"]),
                    int(h["column"]),
                    float(h["weight"]),
                    str(h["model"]),
                    int(h["rounds"]),
                )
                for h in d["heads"]
            ]
            n_dense = int(d["n_dense"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelError(f"boost: malformed ({type(exc).__name__}: {exc})") from exc
        for h in parts:
            if not 0 <= h.column < len(heads) or heads[h.column] != h.head:
                raise ModelError(
                    f"boost of head {h.head!r} at column {h.column}: the model's heads are "
                    f"{list(heads)}"
                )
        return cls(parts, n_dense)

    def summary(self) -> dict[str, dict[str, Any]]:
        """``{head: {"weight", "rounds"}}``: the manifest's and the log's account."""
        return {h.head: {"weight": h.weight, "rounds": h.rounds} for h in self.heads}


def boost_heads(which: str, heads: Sequence[Any]) -> list[int]:
    """The columns of ``heads`` (:class:`~sketchstream.models.events.Head`) that ``which``
    (one of :data:`BOOST_HEADS`) boosts."""
    if which not in BOOST_HEADS:
        raise ModelError(f"boost={which!r}: expected one of {', '.join(BOOST_HEADS)}")
    if which == "off":
        return []
    return [j for j, h in enumerate(heads) if which == "all" or h.horizon is not None]


def fit_boost(
    columns: Sequence[int],
    head_names: Sequence[str],
    train: tuple[np.ndarray, np.ndarray],
    val: tuple[np.ndarray, np.ndarray, np.ndarray],
    *,
    seed: int = 0,
    threads: int = 0,
) -> tuple[HeadBoost | None, dict[str, dict[str, Any]]]:
    """Fit a booster for each head of ``columns`` and pick its weight on validation.

    ``train``: ``(dense, y)`` of the training rows; ``val``: ``(dense, y, logits)`` of the
    validation rows, ``logits`` the MLP's own (``(n, heads)``). ``y`` is nan where a head has
    no label. Returns the :class:`HeadBoost` of the heads whose chosen weight is above 0 (None:
    none) and, for every head tried, ``{"weight", "rounds", "val_auc_mlp", "val_auc"}``.
    """
    import lightgbm as lgb
    from sketchstream.models.metrics import roc_auc

    (x_tr, y_tr), (x_va, y_va, z_va) = train, val
    params = {**PARAMS, "seed": seed, "num_threads": threads}
    kept: list[BoostedHead] = []
    report: dict[str, dict[str, Any]] = {}
    for j in columns:
        name = head_names[j]
        tr, va = ~np.isnan(y_tr[:, j]), ~np.isnan(y_va[:, j])
        yt, yv = y_tr[tr, j], y_va[va, j]
        if len(np.unique(yt)) < 2 or len(np.unique(yv)) < 2:
            log.info("boost %s: one class only in training or validation, not fitted", name)
            continue
        fit_set = lgb.Dataset(x_tr[tr], yt, free_raw_data=True)
        val_set = lgb.Dataset(x_va[va], yv, reference=fit_set)
        booster = lgb.train(
            params,
            fit_set,
            num_boost_round=MAX_ROUNDS,
            valid_sets=[val_set],
            callbacks=[lgb.early_stopping(EARLY_STOP, verbose=False)],
        )
        rounds = booster.best_iteration or booster.current_iteration()
        raw = booster.predict(x_va[va], raw_score=True, num_iteration=rounds)
        mlp = z_va[va, j].astype(np.float64)
        aucs = [roc_auc(yv, (1.0 - w) * mlp + w * raw) for w in WEIGHTS]
        best = int(np.argmax(aucs))  # the first of equals: the smaller weight
        weight = WEIGHTS[best]
        report[name] = {
            "weight": weight,
            "rounds": int(rounds),
            "val_auc_mlp": float(aucs[0]),
            "val_auc": float(aucs[best]),
        }
        log.info(
            "boost %s: %d trees, blend weight %.1f on validation (AUC %.4f, the MLP alone %.4f)",
            name,
            rounds,
            weight,
            aucs[best],
            aucs[0],
        )
        if weight > 0.0:
            text = booster.model_to_string(num_iteration=rounds)
            kept.append(BoostedHead(name, j, weight, text, int(rounds)))
    if not kept:
        return None, report
    return HeadBoost(kept, x_tr.shape[1]), report
