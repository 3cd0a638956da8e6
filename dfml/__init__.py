"""dfml: reproducible data-free meta-learning (PURER and family)."""

__version__ = "0.1.0"
