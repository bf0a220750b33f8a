"""Baseline allocators, each faithful to its paper (or named "-style" with its gaps in docs/method.md)."""
