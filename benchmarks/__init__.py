"""Benchmarks: scripts that measure and append JSON lines to ``benchmarks/results``."""
