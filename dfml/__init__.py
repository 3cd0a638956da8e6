"""dfml: reproducible data-free meta-learning (PURER and family)."""

import os as _os

# OpenMP threads that spin while waiting make torch many times slower as soon as another process
# shares the cores (measured here: an inversion step 0.8 s -> 6 s with 2 threads under load).
# Must be set before torch initialises OpenMP, hence here, before any dfml module imports torch.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"


def _trace_imports(folder: str) -> None:
    """At exit, write the dfml modules this process loaded to <folder>/<script>.<pid>.txt and its arguments to
    <script>.<pid>.argv.json; the tests compare them with the code derived for the job (dfml/codedeps.py)."""
    import atexit
    import json
    import sys

    def write() -> None:
        names = sorted(m for m in sys.modules if m == "dfml" or m.startswith("dfml."))
        script = _os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "python"
        with open(_os.path.join(folder, f"{script}.{_os.getpid()}.txt"), "w") as handle:
            handle.write("\n".join(names) + "\n")
        with open(_os.path.join(folder, f"{script}.{_os.getpid()}.argv.json"), "w") as handle:
            json.dump(sys.argv, handle)

    atexit.register(write)


if _os.environ.get("DFML_TRACE_IMPORTS"):
    _trace_imports(_os.environ["DFML_TRACE_IMPORTS"])
