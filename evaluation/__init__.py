"""Metrics, benchmarks and evaluation commands."""
