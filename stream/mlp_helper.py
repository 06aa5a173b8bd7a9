"""A helper process that runs the engagement MLP of the worker's batches on another core.

The worker is one Python thread, and the MLP was a third of a drained batch's time on it.
:class:`MLPHelper` takes that work to a process of its own: the worker hands a batch's MLP
inputs over (:meth:`MLPHelper.submit`, which never waits) and goes on with the batch's states
and the next batch; the batch's predictions are made when its scores come back, in the part of
the batch that finishes behind the next one (:mod:`sketchstream.stream.bulk`). A thread could
not do it: the MLP is a dozen compiled calls a chunk, each giving the GIL back, and a thread
waiting for the GIL behind the worker's Python waits the interpreter's switch interval each
time (measured: a tenth of the gain of the process).

Each row's score depends on its own inputs only, and the helper runs the worker's own code on
the worker's own weights (sent through the pipe as arrays, with its boosted heads' trees, once
per model: it never reads the artifact store), so a batch's scores are those the worker would
have computed, up to the float32 head product's summation order (within 1e-6).

The helper only accelerates. Whatever goes wrong in it (not started yet, a model still
loading, an exception, a crash, no answer within ``timeout``), the rows it was given are
scored by the worker itself: :meth:`PendingScores.result` does it, so no batch is lost and a
batch's scores never depend on the helper's health. A helper that died is started again after
``retry_after`` seconds; until it answers, the worker scores alone.

Two threads of the worker talk to it: one sends (a batch's inputs are up to half a megabyte,
which would block the worker's thread while the helper is busy with the batch before), one
receives and hands each answer to the :class:`concurrent.futures.Future` of its request
(answers come in the order of the requests).
"""

from __future__ import annotations

import collections
import contextlib
import logging
import multiprocessing
import queue
import signal
import threading
import time
from concurrent.futures import Future, InvalidStateError
from multiprocessing.connection import Connection
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

__all__ = ["HelperFailed", "HelperRaised", "MLPHelper", "PendingScores"]


class HelperFailed(RuntimeError):
    """The helper did not score a request (it raised, died, or did not answer in time)."""


class HelperRaised(HelperFailed):
    """Scoring the request raised in the helper (which is fine and goes on)."""


class PendingScores:
    """The scores of one batch's MLP rows, computed in the helper (:meth:`MLPHelper.submit`).

    :meth:`result` (blocking) or :meth:`wait` (awaitable) gives them; either scores the rows in
    the calling thread when the helper failed them, so the answer never depends on the helper.
    What that in-process call raises (the MLP's own exception) is what they raise."""

    def __init__(self, helper: MLPHelper, future: Future, mlp: Any, inputs: Any) -> None:
        self._helper, self._future, self.mlp, self.inputs = helper, future, mlp, inputs
        self._scores: np.ndarray | None = None

    def result(self) -> np.ndarray:
        """The scores, waiting up to the helper's timeout for them."""
        if self._scores is None:
            try:
                self._scores = self._check(self._future.result(self._helper.timeout))
            except (TimeoutError, HelperFailed) as exc:
                self._scores = self._fallback(exc)
        return self._scores

    async def wait(self) -> np.ndarray:
        """:meth:`result` without blocking the event loop while the helper works."""
        import asyncio

        if self._scores is None:
            try:
                got = await asyncio.wait_for(
                    asyncio.wrap_future(self._future), self._helper.timeout
                )
                self._scores = self._check(got)
            except (TimeoutError, HelperFailed) as exc:
                self._scores = self._fallback(exc)
        return self._scores

    def _check(self, scores: np.ndarray) -> np.ndarray:
        if scores.shape[0] != len(self.inputs):
            raise HelperFailed(f"it answered {scores.shape[0]} rows for {len(self.inputs)}")
        self._helper.rows_helped += len(self.inputs)
        return scores

    def _fallback(self, exc: BaseException) -> np.ndarray:
        if not isinstance(exc, HelperRaised):  # it is broken: given up, started again later
            self._helper.failed(str(exc) if isinstance(exc, HelperFailed) else "no answer in time")
        return self.mlp.predict(self.inputs)


class MLPHelper:
    """Runs :meth:`~sketchstream.models.mlp.EngagementMLP.predict` of the worker's batches in
    a helper process (see the module docstring).

    ``threads``: the helper's torch/BLAS threads; ``timeout``: seconds to wait for an answer,
    or for the helper to start, before giving up on it; ``retry_after``: seconds before a
    helper given up on is started again. :meth:`submit` is called from one thread.
    """

    def __init__(
        self, *, threads: int = 1, timeout: float = 30.0, retry_after: float = 30.0
    ) -> None:
        self.threads = threads
        self.timeout = timeout
        self.retry_after = retry_after
        self.rows_helped = 0  # rows the helper scored
        self.failures = 0  # times it was given up on
        self._process: Any = None
        self._conn: Connection | None = None
        self._outbox: queue.SimpleQueue | None = None
        self._pending: collections.deque[Future] = collections.deque()
        self._ready = threading.Event()
        self._dead = threading.Event()  # the current helper is given up on (or none started)
        self._dead.set()
        self._started_at = 0.0
        self._retry_at = 0.0
        self._sent: Any = None  # the MLP last sent to the helper
        self._sent_id = 0
        self._loaded_id = -1  # the id of the last model the helper loaded (a refused one: not)

    # -- lifecycle --------------------------------------------------------------------------

    def start(self) -> None:
        """Launch the helper; returns at once (it imports torch, a few seconds, while the
        worker scores alone)."""
        self.close()
        ctx = multiprocessing.get_context("spawn")  # never fork a process with threads
        ours, theirs = ctx.Pipe()
        process = ctx.Process(
            target=_serve, args=(theirs, self.threads), name="sketchstream-mlp", daemon=True
        )
        process.start()
        theirs.close()
        self._process, self._conn = process, ours
        self._outbox = queue.SimpleQueue()
        self._ready.clear()
        self._dead.clear()
        self._sent, self._loaded_id = None, -1
        self._started_at = time.monotonic()
        threading.Thread(
            target=self._send_loop, args=(ours, self._outbox), name="mlp-helper-send", daemon=True
        ).start()
        threading.Thread(
            target=self._receive_loop, args=(ours,), name="mlp-helper-receive", daemon=True
        ).start()
        log.info("MLP helper process %d starting", process.pid)

    def close(self) -> None:
        """Stop the helper (if any); requests still waiting are scored by their callers."""
        conn, process, outbox = self._conn, self._process, self._outbox
        self._conn = self._process = self._outbox = None
        self._dead.set()
        self._ready.clear()
        if outbox is not None:
            outbox.put(None)  # the sender says goodbye and stops
        if process is not None:
            process.join(timeout=2.0)
            if process.is_alive():
                process.kill()
                process.join(timeout=2.0)
        if conn is not None:
            conn.close()
        self._fail_pending("the helper stopped")

    def failed(self, why: str) -> None:
        """Give the helper up (it failed a request, or went away): stop it, start another
        ``retry_after`` seconds later."""
        if self._process is None:
            return
        self.failures += 1
        log.warning(
            "MLP helper process %s given up (%s): the worker scores its batches itself, and "
            "starts another helper in %g s",
            self._process.pid,
            why,
            self.retry_after,
        )
        self._dead.set()
        with contextlib.suppress(OSError, ValueError):
            self._process.kill()
        self.close()
        self._retry_at = time.monotonic() + self.retry_after

    @property
    def ready(self) -> bool:
        """Whether the helper answers (started, ready, not given up on)."""
        return self._ready.is_set() and not self._dead.is_set()

    @property
    def serving(self) -> bool:
        """Whether the helper runs the batches' MLP: ready, holding the model last sent."""
        return self.ready and self._sent is not None and self._loaded_id == self._sent_id

    # -- requests ---------------------------------------------------------------------------

    def offer(self, mlp: Any) -> None:
        """Send ``mlp`` to the helper ahead of its first batch (a model just loaded or swapped
        in), when the helper is ready and holds another one."""
        if self._usable() and self._sent is not mlp:
            self._send_model(mlp)

    def _send_model(self, mlp: Any) -> None:
        self._sent_id += 1
        state = {k: v.detach().numpy() for k, v in mlp.state_dict().items()}
        boost = mlp.boost.to_dict() if mlp.boost is not None else None
        self._put(("model", self._sent_id, mlp.config.to_dict(), state, boost))
        self._sent = mlp

    def submit(self, mlp: Any, inputs: Any) -> PendingScores | None:
        """Hand ``mlp.predict(inputs)`` to the helper; None when it cannot take it now (not
        started or not ready yet, given up on, or still loading ``mlp``, which this call sends
        it when it holds another model): the caller scores the batch itself."""
        if not self._usable():
            return None
        if self._sent is not mlp:
            self._send_model(mlp)
            return None
        if self._loaded_id != self._sent_id:  # loading, or refused it (logged)
            return None
        future: Future = Future()
        self._pending.append(future)  # before the request: answers come in request order
        self._put(("score", inputs.dense, inputs.codes))
        if self._dead.is_set():  # it went away meanwhile: nobody would answer or fail it
            self._fail_pending("it went away")
        return PendingScores(self, future, mlp, inputs)

    def _usable(self) -> bool:
        if self._dead.is_set():
            if self._process is not None:  # it went away: clean up, retry later
                self.failed("it went away")
            if self._retry_at and time.monotonic() >= self._retry_at:
                self._retry_at = 0.0
                self.start()
            return False
        if self._ready.is_set():
            return True
        if time.monotonic() - self._started_at > self.timeout:
            self.failed(f"not ready after {self.timeout:g} s")
        return False

    def _put(self, message: tuple[Any, ...]) -> None:
        outbox = self._outbox
        if outbox is not None:
            outbox.put(message)

    def _fail_pending(self, why: str) -> None:
        while self._pending:
            future = self._pending.popleft()
            with contextlib.suppress(InvalidStateError):
                future.set_exception(HelperFailed(why))

    def _send_loop(self, conn: Connection, outbox: queue.SimpleQueue) -> None:
        while True:
            message = outbox.get()
            try:
                conn.send(message)
            except (OSError, ValueError) as exc:
                if message is not None:
                    self._lost(conn, f"cannot send to it: {exc}")
                return
            if message is None:
                return

    def _receive_loop(self, conn: Connection) -> None:
        while True:
            try:
                kind, payload = conn.recv()
            except (OSError, EOFError, ValueError) as exc:
                self._lost(conn, f"it went away: {exc!r}")
                return
            if kind == "ready":
                self._ready.set()
                log.info("MLP helper process ready")
            elif kind == "loaded":
                self._loaded_id = payload
            elif kind == "refused":
                _, text = payload
                log.warning("the MLP helper cannot load the model (%s): the worker scores it", text)
            elif self._pending:
                future = self._pending.popleft()
                with contextlib.suppress(InvalidStateError):  # its waiter gave up (timeout)
                    if kind == "ok":
                        future.set_result(payload)
                    else:
                        future.set_exception(HelperRaised(str(payload)))

    def _lost(self, conn: Connection, why: str) -> None:
        """The pipe ``conn`` broke: fail what waits on it (if it is still the helper's)."""
        if conn is self._conn:
            self._dead.set()
            self._fail_pending(why)


def _serve(conn: Connection, threads: int) -> None:
    """The helper's loop. ``("model", id, config, weights, boost)`` replaces its MLP (``boost``:
    its :class:`~sketchstream.models.boost.HeadBoost` as a dict, or None) and answers
    ``("loaded", id)`` (or ``("refused", (id, text))``); ``("score", dense, codes)`` answers
    ``("ok", scores)`` or ``("error", text)``. None or a closed pipe ends it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the worker decides when it stops
    import torch
    from sketchstream.models.boost import HeadBoost
    from sketchstream.models.mlp import EngagementMLP, MLPConfig, MLPInputs, set_threads

    set_threads(threads)
    mlp = None
    conn.send(("ready", None))
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return
        if message is None:
            return
        if message[0] == "model":
            _, model_id, config, state, boost = message
            mlp = None
            try:
                model = EngagementMLP(MLPConfig.from_dict(config))
                model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()})
                if boost is not None:
                    model.boost = HeadBoost.from_dict(boost, model.config.heads)
                model.eval()
                model.warm_up()  # its kernels compiled (or loaded from numba's cache) now
                mlp = model
                reply: tuple[str, Any] = ("loaded", model_id)
            except Exception as exc:
                reply = ("refused", (model_id, f"{type(exc).__name__}: {exc}"))
        else:
            _, dense, codes = message
            try:
                if mlp is None:
                    raise RuntimeError("it holds no model")
                reply = ("ok", mlp.predict(MLPInputs(dense, codes)))
            except Exception as exc:  # the worker scores these rows itself
                reply = ("error", f"{type(exc).__name__}: {exc}")
        try:
            conn.send(reply)
        except (OSError, ValueError):
            return
