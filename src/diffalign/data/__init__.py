"""Data sets shipped with dependencies (no downloads)."""
