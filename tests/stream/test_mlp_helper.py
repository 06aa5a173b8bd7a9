"""The MLP helper process: the worker's batches scored there equal those scored in the worker,
and whatever happens to the helper, no batch is lost or scored differently."""

from __future__ import annotations

import contextlib
import dataclasses
import time
from concurrent.futures import Future

import numpy as np
import orjson
import pytest
from kafka_harness import build_tiny_artifact, synthetic_events
from sketchstream.models.errors import ModelError
from sketchstream.models.mlp import MLPInputs
from sketchstream.stream.metrics import WorkerMetrics
from sketchstream.stream.mlp_helper import HelperFailed, MLPHelper, PendingScores
from sketchstream.stream.models_feed import load_serving_model
from sketchstream.stream.records import RawMessage
from sketchstream.stream.worker import BatchProcessor


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    root = tmp_path_factory.mktemp("artifacts")
    return load_serving_model(root / build_tiny_artifact(root))


@contextlib.contextmanager
def started(retry_after=3600.0):
    """A helper, started and ready (closed after)."""
    h = MLPHelper(timeout=60.0, retry_after=retry_after)
    h.start()
    try:
        deadline = time.monotonic() + 60.0
        while not h.ready:
            assert time.monotonic() < deadline, "the helper did not start"
            time.sleep(0.05)
        yield h
    finally:
        h.close()


@pytest.fixture(scope="module")
def helper():
    with started() as h:
        yield h


def inputs_for(mlp, n, seed=0):
    rng = np.random.default_rng(seed)
    cfg = mlp.config
    codes = rng.integers(-1, cfg.width, (n, cfg.modalities, cfg.depth)).astype(np.int16)
    return MLPInputs(rng.normal(size=(n, cfg.n_dense)).astype(np.float32), codes)


def submit_when_loaded(helper, mlp, inputs, timeout=60.0):
    """``helper.submit``, again until the helper has loaded ``mlp`` (the first call sends it)."""
    deadline = time.monotonic() + timeout
    while (pending := helper.submit(mlp, inputs)) is None:
        assert time.monotonic() < deadline, "the helper did not load the model"
        time.sleep(0.02)
    return pending


def test_the_helper_scores_as_the_worker_does(model, helper):
    mlp = model.mlp
    assert mlp.boost is not None  # its head blended with trees: the helper gets them too
    for n in (1, 7, 300):
        inputs = inputs_for(mlp, n, seed=n)
        got = submit_when_loaded(helper, mlp, inputs).result()
        np.testing.assert_allclose(got, mlp.predict(inputs), rtol=0, atol=1e-6)
    assert helper.rows_helped >= 308


async def test_scores_are_awaited_without_blocking_the_loop(model, helper):
    mlp = model.mlp
    inputs = inputs_for(mlp, 50, seed=3)
    pending = submit_when_loaded(helper, mlp, inputs)
    np.testing.assert_allclose(await pending.wait(), mlp.predict(inputs), rtol=0, atol=1e-6)


def test_a_helper_that_dies_leaves_its_batch_to_the_worker(model):
    with started() as h:
        mlp = model.mlp
        inputs = inputs_for(mlp, 200, seed=5)
        submit_when_loaded(h, mlp, inputs).result()  # loaded and working
        h._process.kill()
        h._process.join(10)
        pending = h.submit(mlp, inputs)
        got = pending.result() if pending is not None else mlp.predict(inputs)
        np.testing.assert_allclose(got, mlp.predict(inputs), rtol=0, atol=1e-6)
        deadline = time.monotonic() + 10
        while h.ready or h._process is not None:  # noticed, given up, cleaned up
            assert time.monotonic() < deadline
            h.submit(mlp, inputs)
            time.sleep(0.05)
        assert h.failures == 1
        assert h.submit(mlp, inputs) is None, "given up: the worker scores alone until retry"


def test_a_helper_started_again_after_retry_after(model):
    with started(retry_after=0.0) as h:
        first = h._process.pid
        h.failed("a test gives it up")
        deadline = time.monotonic() + 60
        while not h.ready:
            assert time.monotonic() < deadline, "no second helper"
            h.submit(model.mlp, inputs_for(model.mlp, 1))
            time.sleep(0.05)
        assert h._process.pid != first


def test_rows_the_helper_refuses_are_scored_by_the_worker_with_its_error(model, helper):
    mlp = model.mlp
    submit_when_loaded(helper, mlp, inputs_for(mlp, 2))
    cfg = mlp.config
    bad = MLPInputs(  # one dense column too many: the MLP refuses it, here as there
        np.zeros((4, cfg.n_dense + 1), np.float32),
        np.zeros((4, cfg.modalities, cfg.depth), np.int16),
    )
    pending = helper.submit(mlp, bad)
    assert pending is not None
    with pytest.raises(ModelError):
        pending.result()
    failures = helper.failures
    inputs = inputs_for(mlp, 3)
    np.testing.assert_allclose(
        submit_when_loaded(helper, mlp, inputs).result(), mlp.predict(inputs), atol=1e-6
    )
    assert helper.failures == failures, "a request that raises does not give the helper up"


# --- the worker's batches through the helper ---------------------------------------------


def messages(events):
    return [
        RawMessage("events", 0, k, e["user"].encode(), orjson.dumps(e), 1.0)
        for k, e in enumerate(events)
    ]


def run_batches(model, msgs, helper, size=40, behind=2):
    """The batches as the worker handles them: predictions of a batch whose MLP ran in the
    helper made ``behind`` batches later; ``(predictions, dead letters, states, live)``."""
    store = {}

    def read(partitions, keys):
        return [store.get((p, k)) for p, k in zip(partitions, keys, strict=True)]

    proc = BatchProcessor(
        model, read, metrics=WorkerMetrics(), mlp_helper=helper, clock=lambda: 1.0
    )
    predictions, letters, waiting = [], [], []
    for start in range(0, len(msgs), size):
        result = proc.process(msgs[start : start + size])
        for p, key, value in result.table_writes:
            store[(p, key)] = value
        predictions += result.predictions
        letters += result.dlq
        if result.pending is not None:
            waiting.append(result.pending)
        while len(waiting) > behind:
            made, dead, _ = waiting.pop(0).result()
            predictions += made
            letters += dead
    for pending in waiting:
        made, dead, _ = pending.result()
        predictions += made
        letters += dead
    return predictions, letters, store, proc.live.snapshot()


def test_batches_through_the_helper_make_what_the_worker_alone_makes(model, helper):
    submit_when_loaded(helper, model.mlp, inputs_for(model.mlp, 1))
    events = synthetic_events(400, users=9, seed=2)
    rows = helper.rows_helped
    alone = run_batches(model, messages(events), None)
    helped = run_batches(model, messages(events), helper)
    assert helper.rows_helped - rows == 400, "every batch went through the helper"
    (p1, d1, s1, l1), (p2, d2, s2, l2) = alone, helped
    assert [k for k, _ in p1] == [k for k, _ in p2], "the same predictions, in the same order"
    for (_, a), (_, b) in zip(p1, p2, strict=True):
        a, b = orjson.loads(a), orjson.loads(b)
        for head in a["scores"]:
            assert abs(a["scores"][head] - b["scores"][head]) <= 1e-6
        a.pop("scores")
        b.pop("scores")
        assert a == b
    assert d1 == d2 == []
    assert s1 == s2, "the same states"
    assert l1 == l2, "the same live quality, labels met in batch order"


class FailingHelper:
    """A helper that fails every request: the worker scores each batch itself."""

    timeout = 1.0
    rows_helped = 0

    def submit(self, mlp, inputs):
        future = Future()
        future.set_exception(HelperFailed("a test's helper"))
        return PendingScores(self, future, mlp, inputs)

    def offer(self, mlp):
        pass

    def failed(self, why):
        pass


class RaisingMLP:
    """The served MLP, except that a batch holding a row whose first dense value is 7777
    raises (a bug met only by that event's data)."""

    def __init__(self, inner):
        self.inner = inner

    def predict(self, inputs):
        if (inputs.dense[:, 0] == 7777.0).any():
            raise RuntimeError("a row the MLP cannot score")
        return self.inner.predict(inputs)

    def __getattr__(self, name):
        return getattr(self.inner, name)


class MarkingScorer:
    """The served scorer, its MLP a :class:`RaisingMLP`, marking the rows of ``item``."""

    def __init__(self, inner, item):
        self.inner, self.item = inner, item
        self.mlp = RaisingMLP(inner.mlp)

    def inputs(self, features, items, ts, **kwargs):
        got = self.inner.inputs(features, items, ts, **kwargs)
        got.dense[items == self.item, 0] = 7777.0
        return got

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_a_row_whose_mlp_raises_in_the_worker_is_dead_lettered_the_rest_predicted(model):
    events = synthetic_events(60, users=6, seed=8)
    item = events[17]["item"]
    broken = dataclasses.replace(model, scorer=MarkingScorer(model.scorer, item))
    predictions, letters, _, _ = run_batches(broken, messages(events), FailingHelper())
    refused = {orjson.loads(v)["source"]["offset"] for _, v in letters}
    assert refused == {k for k, e in enumerate(events) if e["item"] == item}
    assert all(orjson.loads(v)["reason"] == "processing_error" for _, v in letters)
    assert len(predictions) == len(events) - len(refused)
    predicted = {orjson.loads(v)["event"]["offset"] for _, v in predictions}
    assert predicted.isdisjoint(refused)


class Unloadable:
    """An MLP whose weights do not fit its own config: the helper refuses to load it."""

    def __init__(self, mlp):
        self.config, self.boost, self._mlp = mlp.config, mlp.boost, mlp

    def state_dict(self):
        state = dict(self._mlp.state_dict())
        name = next(iter(state))
        state[name] = state[name][..., :1]  # a weight of the wrong shape
        return state

    def predict(self, inputs):
        return self._mlp.predict(inputs)


def test_a_model_the_helper_cannot_load_is_scored_by_the_worker_and_the_next_served(model, caplog):
    mlp = model.mlp
    inputs = inputs_for(mlp, 10, seed=9)
    with started() as h:
        submit_when_loaded(h, mlp, inputs).result()
        bad = Unloadable(mlp)
        assert h.submit(bad, inputs) is None  # sent to the helper: the worker scores
        deadline = time.monotonic() + 60
        while "cannot load the model" not in caplog.text:
            assert time.monotonic() < deadline, "no refusal"
            time.sleep(0.05)
        # refused, not broken: the worker scores that model's batches, the helper stays
        for _ in range(3):
            assert h.submit(bad, inputs) is None
        assert h.ready and not h.serving and h.failures == 0
        got = submit_when_loaded(h, mlp, inputs).result()  # the next model is served
        np.testing.assert_allclose(got, mlp.predict(inputs), rtol=0, atol=1e-6)
        assert h.serving
