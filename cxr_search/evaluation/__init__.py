"""Evaluation: metrics, the zero-shot benchmark, the retrieval protocol and train/test overlap checks.

The parts of the benchmarks that need neither training nor the search engine. The retrieval benchmark
itself ranks through the engine and lives in :mod:`index.bench.retrieval`; the linear probe trains and
lives in :mod:`train.probe`.

Modules:

* ``retrieval_metrics``: ranks, Recall@K, label-precision@K and bootstrap intervals (ties pessimistic).
* ``classification_metrics``: AUROC, accuracy and F1 as pure functions.
* ``retrieval_protocol``: which studies, texts and query images a retrieval evaluation uses; lists of evaluated ids.
* ``provenance``: what produced a benchmark number (version, git commit, model fingerprint, input hashes).
* ``zeroshot_prompts``: zero-shot tasks and prompts (the reference pairs, GLoRIA's CheXpert bank, variants).
* ``zeroshot``: the zero-shot classification benchmark (``cxr-search bench zeroshot``).
* ``synth_heldout``: retrieval quality on held-out synthetic studies against the generator's ground truth.
* ``overlap``: patient and image overlap between a training and an evaluation manifest.
* ``image_hash``: pixel digests and thumbnails that the overlap check compares.
* ``plot``: Recall@K curves as a PNG (optional extra).
"""
