"""Benchmarks that others can reproduce, and the ``cxr-search bench`` CLI that runs them.

Zero-shot classification and the overlap check are core code (:mod:`cxr_search.evaluation`); the
benchmarks here need the engine.

Modules:

* ``retrieval``: the CXR-CLIP reference retrieval protocol and a fuller one, ranked through the engine.
* ``speed``: encoder throughput, text-query latency and FAISS search latency / recall.
* ``commands``: the ``bench`` sub-app (``retrieval``, ``zeroshot``, ``overlap``, ``speed``).
"""
