"""Temporary: the three names ``tools/`` still imports from here, until the tools refactor in
flight (issue 13) is committed.

The user-state code lives in :mod:`~sketchstream.models.channels`,
:mod:`~sketchstream.models.batches`, :mod:`~sketchstream.models.segments`,
:mod:`~sketchstream.models.state_codec`, :mod:`~sketchstream.models.history_cf` and
:mod:`~sketchstream.models.aggregator`; the benchmarks' synthetic data in
:mod:`sketchstream.tools.synthetic`. The committed ``tools/bench.py`` (its replay worker) and
``tools/stream_bench.py`` still import these names from ``models.state``; their working copies
already import the new modules, but they depend on tools modules not yet committed, so they
cannot be committed alone. Delete this file in the commit after theirs
(``grep -rn "models.state\\b\\|models import state\\b" --include=*.py .`` then finds nothing).
"""

from sketchstream.models.aggregator import Aggregator
from sketchstream.tools.synthetic import state_size_report, synthetic_ratings

__all__ = ["Aggregator", "state_size_report", "synthetic_ratings"]
