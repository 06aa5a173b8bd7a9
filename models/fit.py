"""Fitting the engagement MLP: early stopping on validation, the item-code choice, calibration.

* :class:`Fit` — one MLP's training run (AdamW on masked binary cross-entropy, a one-cycle
  schedule, early stopping on the validation period's mean AUC, fixed seeds) that can pause at
  an epoch's end and go on later exactly as if it had not paused: it keeps its own torch
  random state, so two fits interleaved give what each gives alone.
* :func:`train_mlp` — one :class:`Fit` run to its end.
* :func:`train_choosing_codes` — the item's sketch codes as an input or not
  (``TrainConfig.item_codes``): ``"auto"`` races both for the first two epochs and runs only
  the one ahead on validation to its end.
"""

from __future__ import annotations

import logging
import math
from dataclasses import replace
from typing import Any

import numpy as np
import torch
from sketchstream.models.mlp import EngagementMLP, MLPConfig, MLPInputs, to_tensors

__all__ = ["ITEM_CODES", "Fit", "train_choosing_codes", "train_mlp"]

log = logging.getLogger(__name__)

ITEM_CODES = ("auto", "on", "off")  # TrainConfig.item_codes
RACE_EPOCHS = 2  # "auto": epochs both item-code choices run before one is dropped


def _mean_auc(y: np.ndarray, p: np.ndarray) -> float:
    """Mean AUC over the heads that have both classes among their labelled rows (nan: none)."""
    from sketchstream.models.metrics import roc_auc

    aucs = []
    for h in range(y.shape[1]):
        keep = ~np.isnan(y[:, h])
        if keep.any() and 0 < y[keep, h].mean() < 1:
            aucs.append(roc_auc(y[keep, h], p[keep, h]))
    return float(np.mean(aucs)) if aucs else float("nan")


class Fit:
    """One MLP's training run; :meth:`run` trains up to an epoch's end or to the end.

    ``y_* (n, heads)`` float labels, nan where a head does not apply (masked out of the loss).
    Validation runs ``evals_per_epoch`` times per epoch; training stops after ``patience``
    epochs' worth of checks without improvement. ``ema_epochs`` > 0: what is validated and
    kept is the moving average of the weights over about that many epochs of steps. Every
    member of an ensemble (``config.members``) is fitted to the labels on its own; the
    validation AUC is the ensemble's.
    """

    def __init__(
        self,
        train: MLPInputs,
        y_train: np.ndarray,
        val: MLPInputs,
        y_val: np.ndarray,
        config: MLPConfig,
        *,
        epochs: int = 6,
        patience: int = 1,
        lr: float = 1e-3,
        weight_decay: float = 1e-5,
        batch_size: int = 1024,
        evals_per_epoch: int = 2,
        seed: int = 0,
        progress: bool = True,
        ema_epochs: float = 0.0,
    ) -> None:
        from tqdm.auto import tqdm

        torch.manual_seed(seed)
        self._rng = np.random.default_rng(seed)
        self.model = EngagementMLP(config)
        self.model.set_normalization(train.dense)
        self._val, self._y_val = val, y_val
        self._opt = torch.optim.AdamW(self.model.parameters(), lr=lr, weight_decay=weight_decay)
        self._n = len(train)
        self._batch = batch_size
        self.steps_per_epoch = max(1, -(-self._n // batch_size))
        self._epochs = epochs
        self._sched = torch.optim.lr_scheduler.OneCycleLR(
            self._opt,
            max_lr=lr,
            total_steps=epochs * self.steps_per_epoch,
            pct_start=0.05,
            anneal_strategy="cos",
        )
        self._check_every = max(1, self.steps_per_epoch // max(1, evals_per_epoch))
        self._patience_checks = patience * max(1, evals_per_epoch)
        self._y = torch.from_numpy(np.nan_to_num(y_train, nan=0.0).astype(np.float32))
        self._mask = torch.from_numpy((~np.isnan(y_train)).astype(np.float32))
        self._dense, self._codes = to_tensors(train)
        self._ema = None
        if ema_epochs > 0:
            self._ema_decay = 1.0 - 1.0 / max(1.0, ema_epochs * self.steps_per_epoch)
            self._ema = EngagementMLP(config)
            self._ema.load_state_dict(self.model.state_dict())
        self._torch_state = torch.get_rng_state()  # after the inits that drew from it
        self.best_auc = -math.inf
        self._best_state: dict[str, torch.Tensor] | None = None
        self._bad = 0
        self.history: list[dict[str, float]] = []
        self._step = 0
        self.epochs_done = 0
        self.finished = False
        self._bar = tqdm(
            total=epochs * self.steps_per_epoch,
            desc="train",
            unit="step",
            disable=not progress,
            mininterval=1.0,
        )

    def run(self, until_epoch: int | None = None) -> None:
        """Train to the end of epoch ``until_epoch`` (None: to the end); then :attr:`finished`
        says whether training is over (early stop or the last epoch)."""
        last = self._epochs if until_epoch is None else min(until_epoch, self._epochs)
        torch.set_rng_state(self._torch_state)  # dropout draws from the global generator
        try:
            while not self.finished and self.epochs_done < last:
                self._epoch()
        finally:
            self._torch_state = torch.get_rng_state()
        if self.finished:
            self._bar.close()

    def _epoch(self) -> None:
        model, epoch = self.model, self.epochs_done
        model.train()
        perm = torch.from_numpy(self._rng.permutation(self._n))
        stop = False
        for b in range(self.steps_per_epoch):
            idx = perm[b * self._batch : (b + 1) * self._batch]
            # each member fits the labels on its own (an ensemble, not one wide network)
            logits = model.member_logits(self._dense[idx], self._codes[idx])  # (members, b, heads)
            mask = self._mask[idx].expand_as(logits)
            loss = (
                torch.nn.functional.binary_cross_entropy_with_logits(
                    logits, self._y[idx].expand_as(logits), weight=mask, reduction="sum"
                )
                / mask.sum().clamp(min=1.0)
                * logits.shape[0]
            )
            self._opt.zero_grad(set_to_none=True)
            loss.backward()
            self._opt.step()
            self._sched.step()
            self._step += 1
            if self._ema is not None:
                with torch.no_grad():
                    for e, p in zip(self._ema.parameters(), model.parameters(), strict=True):
                        e.lerp_(p, 1.0 - self._ema_decay)
            self._bar.update(1)
            if self._step % self._check_every == 0 or b == self.steps_per_epoch - 1:
                stop = self._validate(loss.item(), epoch)
                if stop:
                    break
        self.epochs_done += 1
        if stop:
            log.info("early stop at epoch %d (best val AUC %.4f)", epoch, self.best_auc)
        if stop or self.epochs_done >= self._epochs:
            self.finished = True

    def _validate(self, loss: float, epoch: int) -> bool:
        """Judge the weights on validation, keep the best; True: stop early."""
        judged = self.model if self._ema is None else self._ema
        auc = _mean_auc(self._y_val, judged.predict(self._val))
        self.history.append(
            {
                "epoch": self._step / self.steps_per_epoch,  # epochs done, 1.0 after the first
                "step": self._step,
                "loss": loss,
                "val_auc": auc,
            }
        )
        self._bar.set_postfix(val_auc=f"{auc:.4f}")
        log.info("step %d epoch %d: val AUC %.4f", self._step, epoch, auc)
        if auc > self.best_auc + 1e-5:
            self.best_auc, self._bad = auc, 0
            self._best_state = {k: v.detach().clone() for k, v in judged.state_dict().items()}
            return False
        self._bad += 1
        return self._bad >= self._patience_checks

    def result(self) -> tuple[EngagementMLP, list[dict[str, float]]]:
        """The best model seen on validation (in eval mode) and the history of checks."""
        self._bar.close()
        if self._best_state is not None:
            self.model.load_state_dict(self._best_state)
        self.model.eval()
        return self.model, self.history


def train_mlp(
    train: MLPInputs,
    y_train: np.ndarray,
    val: MLPInputs,
    y_val: np.ndarray,
    config: MLPConfig,
    **fit: Any,
) -> tuple[EngagementMLP, list[dict[str, float]]]:
    """Train an :class:`EngagementMLP` to the end (:class:`Fit`, whose keyword arguments
    ``fit`` are); return the best model by validation AUC and the history of checks."""
    run = Fit(train, y_train, val, y_val, config, **fit)
    run.run()
    return run.result()


def train_distilled(
    teacher: EngagementMLP,
    teacher_history: list[dict[str, Any]],
    train: MLPInputs,
    y_train: np.ndarray,
    val: MLPInputs,
    y_val: np.ndarray,
    config: MLPConfig,
    weight: float,
    fit: dict[str, Any],
) -> tuple[EngagementMLP, list[dict[str, Any]]]:
    """A student MLP of ``config``'s shape fitted to ``y_train`` blended with ``teacher``'s
    probabilities on the same rows (``weight`` of the teacher's; a head's unlabelled rows
    stay out of the loss), validated on the labels alone like any fit; it keeps the teacher's
    choice of item codes. Returns the student and the history: the teacher's rows (marked
    ``"teacher": True``), then the student's."""
    soft = teacher.predict(train).astype(np.float64)
    y_soft = np.where(np.isnan(y_train), np.nan, (1.0 - weight) * y_train + weight * soft)
    config = replace(config, modalities=teacher.config.modalities)
    student, history = train_mlp(train, y_soft, val, y_val, config, **fit)
    best = max((h["val_auc"] for h in teacher_history), default=float("nan"))
    log.info(
        "distilled: hidden %d from %d, best validation AUC %.4f (teacher %.4f)",
        config.hidden,
        teacher.config.hidden,
        max((h["val_auc"] for h in history), default=float("nan")),
        best,
    )
    codes = "on" if config.modalities else "off"
    return student, [{**h, "teacher": True} for h in teacher_history] + [
        {**h, "item_codes": codes} for h in history
    ]


def train_choosing_codes(
    train: MLPInputs,
    y_train: np.ndarray,
    val: MLPInputs,
    y_val: np.ndarray,
    config: MLPConfig,
    item_codes: str,
    fit: dict[str, Any],
) -> tuple[EngagementMLP, list[dict[str, float]]]:
    """:func:`train_mlp` with the item's sketch codes as an input or without, as
    ``item_codes`` says; ``"auto"`` runs both for :data:`RACE_EPOCHS` and only the one with the
    higher best validation AUC then (ties: with the codes) to its end: the kept model is the
    one that choice gives alone, for little more than one fit. The history's rows carry
    ``item_codes`` ("on"/"off"), and the kept model's rows come last."""
    choices = ("on", "off") if item_codes == "auto" else (item_codes,)
    if config.modalities == 0:
        choices = ("off",)  # no codebook feeds the sparse layer: nothing to choose

    def shape(c: str) -> MLPConfig:
        return config if c == "on" else replace(config, modalities=0)

    runs = {c: Fit(train, y_train, val, y_val, shape(c), **fit) for c in choices}
    if len(runs) > 1:
        for c, run in runs.items():
            run.run(until_epoch=RACE_EPOCHS)
            log.info("item codes %s: best validation AUC %.4f so far", c, run.best_auc)
    kept = max(choices, key=lambda c: (runs[c].best_auc, c == "on"))
    runs[kept].run()
    log.info("item codes %s kept: best validation AUC %.4f", kept, runs[kept].best_auc)
    rows = {c: [{**h, "item_codes": c} for h in runs[c].result()[1]] for c in choices}
    model = runs[kept].model
    return model, [r for c in choices if c != kept for r in rows[c]] + rows[kept]
