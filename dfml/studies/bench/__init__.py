"""Performance benchmark of the PURER meta-iteration (issue 8): engine vs sequential reference.

``tools/benchmark.py`` is the command; :mod:`dfml.studies.bench.reference` holds the sequential
reference (per-member and per-task Python loops over the same modules and losses),
:mod:`dfml.studies.bench.suite` the measurements and :mod:`dfml.studies.bench.report` the table, CSV, JSON and plot.
"""

from dfml.studies.bench.reference import ReferencePurer
from dfml.studies.bench.suite import BenchOptions, run_benchmark

__all__ = ["BenchOptions", "ReferencePurer", "run_benchmark"]
