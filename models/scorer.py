"""The scoring paths: engagement (aggregator features + item snapshot → assemble → MLP) and
top-k recommendations (a user's state → the recommender's inputs → catalogue top-k).

The trainer's evaluation (:func:`~sketchstream.models.trainer.score_events`) and the streaming
worker (``ServingModel.predict``) both score through :meth:`Scorer.score`, so what is served
is what was evaluated::

    scorer = Scorer.from_bundle(bundle)              # a loaded model artifact
    p = scorer.score(features, items, ts)            # (n, heads), the artifact's snapshot
    p = scorer.score(features, items, ts, snapshot=fresher)   # a refreshed snapshot

:class:`Recommender` answers top-k requests from stored user states. It reads a state exactly
as the offline replay reads it before an event at time ``ts`` (``score_then_fold`` with
``with_sketches``, on a throw-away copy: a request never changes a state), so a request at
``ts`` is ranked as :func:`~sketchstream.models.recommend.replay_inputs` would rank an event
of that user at ``ts``::

    rec = Recommender(bundle.recommender, aggregator)
    answers = rec.recommend(blobs, ts, k=[10], exclude_seen=[True])   # one per request
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
import scipy.sparse as sp
from sketchstream.models.errors import ModelError
from sketchstream.models.mlp import EngagementMLP, MLPInputs, assemble
from sketchstream.models.snapshot import ItemSnapshot

__all__ = ["Recommendation", "Recommender", "Scorer"]

# A probe event's offset: above any real one, so the probe is never taken for a redelivery.
_PROBE_OFFSET = 1 << 62


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


class Recommendation(NamedTuple):
    """One answer: ``items`` best first, their ``scores`` (sum of the items' level
    log-probabilities), and ``cold_start`` (the user has no stored state)."""

    items: list[str]
    scores: list[float]
    cold_start: bool


class Recommender:
    """Top-k recommendations from stored user states (see the module docstring).

    ``parts``: an artifact's :class:`~sketchstream.models.artifacts.RecommenderParts`;
    ``aggregator``: the :class:`~sketchstream.models.aggregator.Aggregator` on the same
    artifact's codebooks (the one the engagement heads use).
    """

    def __init__(self, parts: Any, aggregator: Any) -> None:
        from sketchstream.models.emde import item_hash

        self.parts = parts
        self.model = parts.model
        self.spec = parts.spec
        self.catalogue = parts.catalogue
        self.aggregator = aggregator
        self._codebooks = [aggregator.codebooks[m] for m in aggregator.modalities]
        hashes = item_hash(self.catalogue.ids)
        self._hash_order = np.argsort(hashes)
        self._hashes = hashes[self._hash_order]  # sorted: a history hash -> catalogue row

    @property
    def has_categories(self) -> bool:
        return self.catalogue.categories is not None

    def inputs(self, blobs: Sequence[bytes | None], ts: np.ndarray) -> tuple[np.ndarray, Any]:
        """The model's inputs ``(n, spec.n_features)`` float16 of each state in ``blobs``
        (None: a new user) read at ``ts (n,)``, and the loaded states (one row per blob)."""
        from sketchstream.models.batches import EventBatch
        from sketchstream.models.recommend import state_last_codes, user_inputs

        n = len(blobs)
        agg = self.aggregator
        state = agg.load(list(blobs))  # one row per request: probes never see each other
        rows = np.arange(n)
        last = None
        if self.spec.recent_decays:  # read before the probe: the state's own history
            last = state_last_codes(state, rows, self._codebooks, self.spec.recent_length)
        probe = EventBatch(
            user_index=rows,
            item=np.full(n, self.catalogue.ids[0], dtype=object),
            action=np.full(n, -1, np.int64),  # no action: folded into no channel
            value=np.full(n, np.nan, np.float32),
            ts=np.asarray(ts, np.float64),
            partition=np.zeros(n, np.int32),
            offset=np.full(n, _PROBE_OFFSET, np.int64),
        )
        hist_len = state.hist_len.copy()
        hist_item = state.hist_item.copy()
        features = agg.score_then_fold(state, probe, with_sketches=True)
        state.hist_len, state.hist_item = hist_len, hist_item  # the history before the probe
        return user_inputs(features, self.spec, last), state

    def seen(self, state: Any, wanted: Sequence[bool]) -> sp.csr_matrix:
        """``(n, n_items)`` sparse bool: the catalogue items in the bounded history of each
        state whose ``wanted (n,)`` is set (rows of the others are empty). Sparse: a history
        holds a few dozen items, a catalogue up to millions."""
        n, k = state.hist_item.shape
        used = (np.arange(k)[None, :] < state.hist_len[:, None]) & np.asarray(wanted)[:, None]
        user, slot = np.nonzero(used)
        h = state.hist_item[user, slot]
        at = np.minimum(np.searchsorted(self._hashes, h), len(self._hashes) - 1)
        known = self._hashes[at] == h
        return sp.csr_matrix(
            (np.ones(int(known.sum()), bool), (user[known], self._hash_order[at[known]])),
            shape=(n, len(self.catalogue)),
        )

    def recommend(
        self,
        blobs: Sequence[bytes | None],
        ts: Sequence[float],
        *,
        k: Sequence[int],
        exclude_seen: Sequence[bool],
        categories: Sequence[Sequence[str] | None] | None = None,
    ) -> list[Recommendation]:
        """One :class:`Recommendation` per stored state in ``blobs``, read at ``ts``: its
        ``k`` best catalogue items, less the items of its history when ``exclude_seen``, only
        items of ``categories`` when given (None: any). One model call for them all, one
        catalogue ``top_k`` call per distinct ``(k, categories)``."""
        x, state = self.inputs(blobs, np.asarray(ts, np.float64))
        log_probs = self.model.log_probs(x)
        seen = self.seen(state, exclude_seen) if any(exclude_seen) else None
        cats = categories if categories is not None else [None] * len(blobs)
        groups: dict[tuple[int, tuple[str, ...] | None], list[int]] = {}
        for i in range(len(blobs)):
            key = (int(k[i]), None if cats[i] is None else tuple(cats[i]))
            groups.setdefault(key, []).append(i)
        out: list[Recommendation | None] = [None] * len(blobs)
        for (kk, cat), rows in groups.items():
            wanted = self.catalogue.candidates(cat) if cat is not None else None
            ids, scores = self.catalogue.top_k(
                log_probs[rows],
                kk,
                exclude=None if seen is None else seen[rows],
                candidates=wanted,
            )
            for j, i in enumerate(rows):
                n = len(ids[j])  # rows are padded with -inf to the longest
                out[i] = Recommendation(ids[j], scores[j, :n].tolist(), blobs[i] is None)
        return out  # type: ignore[return-value]
