"""Benchmarks of dream_fast's kernels, model steps and sampler against reference PyTorch.

Run one with `python -m benchmarks.benchmark_<op>`; rows go to a CSV read by `benchmarks.report`.
"""
