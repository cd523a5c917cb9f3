"""Benchmarks that others can reproduce: retrieval protocols, zero-shot classification, overlap, speed."""
