"""lungcore kernel and training-step microbenchmarks (``python -m benchmarks.run --help``)."""
