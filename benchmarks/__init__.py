"""Benchmark programs and their committed reports."""
