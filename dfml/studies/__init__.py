"""Studies: code that measures or reports on the pipeline's runs, outside its phases.

``attack`` (the untrusted-members section of the report: accuracy against the untrusted fraction, how the
member weights separate honest from untrusted members), ``bench`` (the inversion engine's performance suite
against a sequential reference, tools/benchmark.py), ``diagnostics`` (how far meta-training moved the pseudo
data, tools/pseudo_drift.py) and ``recovery`` (FREE's recovery speed against generators trained from scratch
and pixel inversion, tools/bench_recovery.py). The phases (dfml.metatrain, the rule scripts) never import
them; the report script imports ``attack`` for its section.
"""
