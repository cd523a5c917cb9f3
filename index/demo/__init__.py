"""``cxr-search demo``: synthetic archive -> training -> index -> example queries -> Recall@K, end to end.

The demo trains through a function ``cli.py`` passes in, so this package does not import ``train``.

Modules:

* ``run``: the stages, their timings and resumption (:func:`~index.demo.run.run_demo`).
* ``data``: the data stages: synthetic PACS export, manifest with a patient hold-out, image cache.
* ``queries``: the example queries and the one-page HTML gallery.
* ``render``: the terminal report.
* ``defaults``: the default size (no imports, so the CLI reads it cheaply).
"""
