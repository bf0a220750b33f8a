"""Benchmarks: each writes bench/results/<name>.json and .md and prints the command that reproduces it."""
