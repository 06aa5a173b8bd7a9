"""Gradient-boosted trees on the MLP's own dense inputs, blended with some of its heads.

The return head asks "will this user have another event within H": a question about the
user's counts and gaps, which trees split well and the MLP's smooth layers fit less sharply.
LightGBM on the very columns the MLP reads, its logit averaged with the MLP's, put ML-1M's
return head ahead of the counts-and-recency GBDT baseline beyond the bootstrap interval, where
the MLP alone was behind it (README, Training: the four data sets, three seeds).

:func:`fit_boost` fits one booster a head on the training rows, early-stopped on validation,
then picks the blend weight ``w`` (the booster's share of the logit, 0, 0.1, ..., 1) on
validation AUC: ``w = 0`` keeps the MLP alone and drops the booster, so a data set where the
trees add nothing serves the MLP as before. :class:`HeadBoost` is what the model carries:
:meth:`~sketchstream.models.mlp.EngagementMLP.predict` blends with it, so the trainer, the
worker, its helper process, ``evaluate`` and the refresh job all score through the same
code. The fitted trees are kept as plain arrays (:class:`Trees`: JSON in the artifact, no
pickle) and scored by a compiled loop (:func:`~sketchstream.models.mlp_kernels.tree_scores`,
LightGBM's own raw score to the bit, ~25 % faster than its predict on ML-1M's rows, and no
LightGBM import where a model is served: it took ~0.9 s of a worker's and its helper's start).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from sketchstream.models import kernels, mlp_kernels
from sketchstream.models.errors import ModelError

__all__ = ["BOOST_HEADS", "BoostedHead", "HeadBoost", "Trees", "boost_heads", "fit_boost"]

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


_TREE_ARRAYS = (
    ("feature", np.int32),
    ("threshold", np.float64),
    ("left", np.int32),
    ("right", np.int32),
    ("leaf_value", np.float64),
    ("roots", np.int32),
)


@dataclass(frozen=True, eq=False)
class Trees:
    """A booster's trees as flat arrays. Internal node ``k`` splits on column ``feature[k]``:
    a row goes to ``left[k]`` when its value is ``<= threshold[k]`` (NaN read as 0, LightGBM's
    rule for a split that saw no missing values), else to ``right[k]``; a child ``c < 0`` is
    the leaf ``~c`` with ``leaf_value[~c]``. ``roots``: each tree's first node (a leaf for a
    tree of one). A child's index is always above its parent's, so every walk ends."""

    feature: np.ndarray
    threshold: np.ndarray
    left: np.ndarray
    right: np.ndarray
    leaf_value: np.ndarray
    roots: np.ndarray

    def __post_init__(self) -> None:
        nodes, leaves = len(self.feature), len(self.leaf_value)
        if not all(len(a) == nodes for a in (self.threshold, self.left, self.right)):
            raise ModelError("boost: the trees' node arrays differ in length")
        index = np.arange(nodes)
        for name in ("left", "right"):
            child = getattr(self, name)
            bad = ((child >= 0) & (child <= index)) | (child >= nodes) | (~child >= leaves)
            if bad.any():
                raise ModelError(f"boost: node {int(np.argmax(bad))} has a bad {name} child")
        if ((self.roots >= nodes) | (~self.roots >= leaves)).any():
            raise ModelError("boost: a tree's root is neither a node nor a leaf")
        if (self.feature < 0).any():
            raise ModelError("boost: a split reads a negative column")
        if not np.isfinite(self.leaf_value).all() or np.isnan(self.threshold).any():
            raise ModelError("boost: a leaf value or threshold is not a number")

    @classmethod
    def from_booster(cls, booster: Any, rounds: int) -> Trees:
        """The first ``rounds`` trees of a LightGBM ``Booster`` fitted on numerical columns
        without missing values (any other split kind is an error)."""
        arrays: dict[str, list[Any]] = {name: [] for name, _ in _TREE_ARRAYS}

        def walk(node: Mapping[str, Any]) -> int:
            if "split_feature" not in node:
                arrays["leaf_value"].append(node["leaf_value"])
                return ~(len(arrays["leaf_value"]) - 1)
            kind = (node["decision_type"], node["missing_type"])
            if kind != ("<=", "None"):
                raise ModelError(f"boost: a split of kind {kind} (only <= without missing)")
            k = len(arrays["feature"])
            arrays["feature"].append(node["split_feature"])
            arrays["threshold"].append(node["threshold"])
            arrays["left"].append(0)
            arrays["right"].append(0)
            arrays["left"][k] = walk(node["left_child"])
            arrays["right"][k] = walk(node["right_child"])
            return k

        for tree in booster.dump_model(num_iteration=rounds)["tree_info"]:
            arrays["roots"].append(walk(tree["tree_structure"]))
        return cls(**{name: np.asarray(arrays[name], dtype) for name, dtype in _TREE_ARRAYS})

    def raw(self, x: np.ndarray) -> np.ndarray:
        """``(n,)`` float64: the trees' summed leaves for the rows of ``x (n, F)``: compiled
        (:func:`~sketchstream.models.mlp_kernels.tree_scores`) unless the kernels are off,
        then :meth:`raw_reference`, the same sums in the same order."""
        if not kernels.ENABLED:
            return self.raw_reference(x)
        out = np.empty(len(x), np.float64)
        mlp_kernels.tree_scores(
            np.ascontiguousarray(x),
            self.feature,
            self.threshold,
            self.left,
            self.right,
            self.leaf_value,
            self.roots,
            out,
        )
        return out

    def raw_reference(self, x: np.ndarray) -> np.ndarray:
        """:meth:`raw` in numpy: every row down each tree a level at a time."""
        out = np.zeros(len(x), np.float64)
        rows = np.arange(len(x))
        for root in self.roots:
            node = np.full(len(x), root, np.int64)
            inner = node >= 0
            while inner.any():
                at, k = rows[inner], node[inner]
                v = np.nan_to_num(x[at, self.feature[k]].astype(np.float64), nan=0.0)
                node[inner] = np.where(v <= self.threshold[k], self.left[k], self.right[k])
                inner = node >= 0
            out += self.leaf_value[~node]
        return out

    @property
    def columns(self) -> int:
        """One more than the highest column a split reads (0: no split)."""
        return int(self.feature.max()) + 1 if len(self.feature) else 0

    def to_dict(self) -> dict[str, list[Any]]:
        return {name: getattr(self, name).tolist() for name, _ in _TREE_ARRAYS}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Trees:
        return cls(**{name: np.asarray(d[name], dtype) for name, dtype in _TREE_ARRAYS})


@dataclass(frozen=True, eq=False)
class BoostedHead:
    """One head's trees: ``column`` of the model's heads, ``weight`` their share of the
    blended logit, ``rounds`` how many."""

    head: str
    column: int
    weight: float
    trees: Trees
    rounds: int

    def __post_init__(self) -> None:
        if not 0.0 < self.weight <= 1.0:
            raise ModelError(f"boost of head {self.head!r}: weight {self.weight} not in (0, 1]")


class HeadBoost:
    """The trees of a model's heads, applied to its logits (:meth:`blend`)."""

    def __init__(self, heads: Sequence[BoostedHead], n_dense: int) -> None:
        self.heads = tuple(heads)
        self.n_dense = n_dense
        for h in self.heads:
            if h.trees.columns > n_dense:
                raise ModelError(
                    f"boost of head {h.head!r}: its trees read column {h.trees.columns - 1}, "
                    f"the model's dense block has {n_dense}"
                )

    def blend(self, dense: np.ndarray, logits: np.ndarray) -> None:
        """``logits (n, heads)``, in place: each boosted head's column becomes
        ``(1 - w) * its logit + w * its trees' raw score`` on ``dense (n, n_dense)``."""
        if not len(dense):
            return
        for h in self.heads:
            column = logits[:, h.column]
            column *= 1.0 - h.weight
            column += h.weight * h.trees.raw(dense)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form: the artifact's file, the helper's message."""
        return {
            "n_dense": self.n_dense,
            "heads": [
                {
                    "head": h.head,
                    "column": h.column,
                    "weight": h.weight,
                    "rounds": h.rounds,
                    "trees": h.trees.to_dict(),
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
                    Trees.from_dict(h["trees"]),
                    int(h["rounds"]),
                )
                for h in d["heads"]
            ]
            n_dense = int(d["n_dense"])
        except (KeyError, TypeError, ValueError, OverflowError) as exc:
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
        trees = Trees.from_booster(booster, rounds)
        raw = trees.raw(x_va[va])
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
            kept.append(BoostedHead(name, j, weight, trees, int(rounds)))
    if not kept:
        return None, report
    return HeadBoost(kept, x_tr.shape[1]), report
