"""Side-by-side benchmarks (see README.md); `python -m benchmarks.run`."""
