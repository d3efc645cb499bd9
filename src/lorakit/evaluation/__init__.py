"""Judging a result: sample grids, sweeps, fit metrics and diagnostics, HTML reports."""
