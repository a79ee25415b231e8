"""Reproduction drivers: one resumable grid of recipe runs per results table (see ``docs/results.md``)."""
