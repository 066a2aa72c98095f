"""scm-bench: continuous-time consistency models (sCM; Lu & Song 2024) with a reproducible pipeline."""

__version__ = "0.1.0"
