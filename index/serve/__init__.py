"""``cxr-search serve``: the search engine as a web service (FastAPI + uvicorn).

Modules: :mod:`~index.serve.config` (settings and their secure defaults), :mod:`~index.serve.engine`
(the warm model, index generations and their reload, queries, thumbnails), :mod:`~index.serve.uploads`
(in-memory, size-limited, type-checked query images), :mod:`~index.serve.auth` (bearer tokens hashed at
rest), :mod:`~index.serve.audit` (the append-only audit log), :mod:`~index.serve.models` (the API's typed
bodies), :mod:`~index.serve.deps` (FastAPI dependencies), :mod:`~index.serve.routes` (one router per
concern), :mod:`~index.serve.app` (the app factory, security headers, metrics) and
:mod:`~index.serve.commands` (the ``serve`` command group).
"""
