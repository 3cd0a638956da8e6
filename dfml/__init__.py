"""dfml: reproducible data-free meta-learning (PURER and family)."""

import os as _os

# OpenMP threads that spin while waiting make torch many times slower as soon as another process
# shares the cores (measured here: an inversion step 0.8 s -> 6 s with 2 threads under load).
# Must be set before torch initialises OpenMP, hence here, before any dfml module imports torch.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
