"""Benchmarks behind `peftkern bench`: each op beside its baselines, in one process, on one input.

They live in the package (not only in benchmarks/) so `peftkern bench` works from any install.
"""
