"""Benchmarks behind `make bench`: speed figures printed as ratios from one run, never asserted in tests."""
