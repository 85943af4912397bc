"""Benchmarks: one module per ``prfaas bench NAME``; each prints its figures and the baseline of the same run."""
