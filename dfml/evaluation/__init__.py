"""How a model is scored on real episodes: meta-val selection during meta-training and the meta-test phase.

* ``episodes``: fixed episode sets (one per dataset of a scenario) and the per-episode mean over datasets;
* ``stats``: mean and 95% CI, paired differences, Holm's correction (Student's t throughout);
* ``protocol``: evaluation protocols (test-time steps, queries) and the learner they adapt with;
* ``batched``: the engine that scores an episode set in chunks (threads on CPU, stacked on GPU);
* ``scoring``: plain adaptation's scorer (what selection, ``plain`` and ``steps`` run);
* ``selection``: meta-val selection of each protocol's model during meta-training;
* ``icfil``, ``icfil_stacked``, ``icfil_scoring``: ICFIL, a meta-test calibration: its stages per episode and
  on stacked episodes, and its scorer;
* ``tuning``: ICFIL's settings and the steps control tuned on meta-val, never on meta-test.

The meta-test phase itself is dfml/metatest.py; the seeds of every episode stream are dfml/seeds.py. Nothing is
imported here, so a module of the package loads only what it uses.
"""
