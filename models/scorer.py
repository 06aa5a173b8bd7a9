"""The one scoring path: aggregator features + item snapshot → assemble → MLP predict.

The trainer's evaluation (:func:`~sketchstream.models.trainer.score_events`) and the streaming
worker (``ServingModel.predict``) both score through :meth:`Scorer.score`, so what is served
is what was evaluated::

    scorer = Scorer.from_bundle(bundle)              # a loaded model artifact
    p = scorer.score(features, items, ts)            # (n, heads), the artifact's snapshot
    p = scorer.score(features, items, ts, snapshot=fresher)   # a refreshed snapshot
"""

from __future__ import annotations

from typing import Any

import numpy as np
from sketchstream.models.errors import ModelError
from sketchstream.models.mlp import EngagementMLP, MLPInputs, assemble
from sketchstream.models.snapshot import ItemSnapshot

__all__ = ["Scorer"]


class Scorer:
    """An MLP and the item snapshot it reads (None: a model without item features)."""

    def __init__(self, mlp: EngagementMLP, snapshot: ItemSnapshot | None = None) -> None:
        self.mlp = mlp
        self.snapshot = snapshot

    @classmethod
    def from_bundle(cls, bundle: Any) -> Scorer:
        """From a :class:`~sketchstream.models.artifacts.ModelBundle`."""
        return cls(bundle.model, getattr(bundle, "item_snapshot", None))

    @property
    def item_similarity(self) -> Any:
        """The snapshot's item-item similarity: pass it to ``Aggregator.score_then_fold``
        (``item_similarity=``) so the features carry the CF columns the model was trained on."""
        return None if self.snapshot is None else getattr(self.snapshot, "similarity", None)

    @property
    def heads(self) -> tuple[str, ...]:
        return tuple(self.mlp.config.heads)

    def inputs(
        self,
        features: Any,
        items: np.ndarray,
        ts: np.ndarray,
        *,
        snapshot: ItemSnapshot | None = None,
    ) -> MLPInputs:
        """MLP inputs of ``n`` events: the aggregator's ``Features`` (n rows), the events'
        ``items (n,)`` and ``ts (n,)``; item features from ``snapshot`` (default: own)."""
        snap = snapshot if snapshot is not None else self.snapshot
        item_features = None
        if snap is not None:
            if len(items) != len(features.valid):
                raise ModelError(
                    f"Scorer: {len(items)} items for {len(features.valid)} feature rows"
                )
            item_features = snap.features(items, ts)
            if (
                getattr(snap, "similarity", None) is not None
                and getattr(features, "cf", None) is None
            ):
                raise ModelError(
                    "Scorer: the item snapshot has an item similarity but the features have no "
                    "CF columns: call score_then_fold(..., item_similarity=scorer.item_similarity)"
                )
        user_rates = bool(getattr(self.mlp.config, "user_rates", False))
        return assemble(features, item_features, user_rates=user_rates)

    def score(
        self,
        features: Any,
        items: np.ndarray,
        ts: np.ndarray,
        *,
        snapshot: ItemSnapshot | None = None,
    ) -> np.ndarray:
        """Engagement probabilities ``(n, heads)`` float32 (see :meth:`inputs`)."""
        return self.mlp.predict(self.inputs(features, items, ts, snapshot=snapshot))
