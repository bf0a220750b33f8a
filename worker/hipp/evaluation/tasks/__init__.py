"""Benchmarks in their official formats: POPE (``pope``) and ScienceQA (``scienceqa``).

Each module writes the testbed's synthetic version, reads the official files through the same loader,
parses answers the way the official evaluation scripts do, and computes the official metrics.
"""
