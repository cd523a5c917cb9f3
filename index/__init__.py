"""The search engine: archive to answers. Store, ingestion, embedding, FAISS indices, search, benchmarks.

An index folder (:mod:`index.index_dir`) holds a relational store of studies, images, report sections
and their vectors (the source of truth), plus three FAISS files (images, sections, studies) synced to it. ``index`` uses
the core (``cxr_search``) and never imports ``train``.

Modules:

* ``store``: the relational store (SQLAlchemy; SQLite by default).
* ``privacy``: the index's secret: pseudonymous patient keys and encrypted file paths.
* ``ingest``: cataloguing an archive (PACS export or manifest) into store rows; ``ingest_accounting``
  (what the intake did with every input, and the removals it honours), ``ingest_copies`` (duplicate
  copies of a SOPInstanceUID: the one that decodes is kept), ``ingest_reports`` (RIS CSV, SR and
  manifest reports).
* ``embed``: embedding the pending images and report sections into stored vectors (reader, mapper and writer
  stages shared by the executors); ``ray_executor``: the same stages on a Ray cluster.
* ``engines``: SQLAlchemy engines of the store, read-only where a reader opens it.
* ``layout``: what an index folder may hold; ``lock``: the writer lock; ``removal``: removals and tombstones;
  ``failures``: the failed and skipped inputs.
* ``index_dir``: index folders: create, open, remove studies, sync the FAISS files, stats.
* ``build``: ``index build`` / ``index add``: catalogue, embed and sync in one run.
* ``filters``: what a query asks for (filters, k, level, returns), checked before anything is loaded.
* ``search``: text and image queries with filters.
* ``query_checks``: warnings about a query (unknown words, truncation).
* ``model_ref``: which model to load for an index (the one it recorded, unless one is given).
* ``html``: the ``--html`` page of hits.
* ``verify``: ``index verify``: completeness and consistency checks (``verify_intake``: duplicate copies
  and the files of the archive).
* ``commands``: the ``index`` CLI sub-app; ``search_commands``: the ``search`` one.

Packages: ``ann`` (FAISS indices: factory rule, building, the exact reference), ``bench`` (reproducible
benchmarks and their CLI), ``demo`` (``cxr-search demo``, end to end on a synthetic archive), ``serve``
(``cxr-search serve``: the web page and JSON API) and ``node`` (``cxr-search node`` and the DICOMweb import:
live intake from the PACS).
"""
