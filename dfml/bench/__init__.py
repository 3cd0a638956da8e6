"""Performance benchmark of the PURER meta-iteration (issue 8): engine vs sequential reference.

``scripts/benchmark.py`` is the command; :mod:`dfml.bench.reference` holds the sequential
reference (per-member and per-task Python loops over the same modules and losses),
:mod:`dfml.bench.suite` the measurements and :mod:`dfml.bench.report` the table, CSV, JSON and plot.
"""

from dfml.bench.reference import ReferencePurer
from dfml.bench.suite import BenchOptions, run_benchmark

__all__ = ["BenchOptions", "ReferencePurer", "run_benchmark"]
