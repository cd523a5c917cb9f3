"""``GET /healthz`` (readiness, no token needed: it holds no patient data) and ``GET /metrics``."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from index.serve.deps import ApiCaller, EngineDep, GenerationDep
from index.serve.models import HealthOut

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=HealthOut)
def healthz(engine: EngineDep, gen: GenerationDep) -> HealthOut:
    """200 once the model and the FAISS files are loaded: the generation, its counts and the model."""
    return HealthOut(status="ok", index_generation=gen.id, counts=gen.counts, model_sha256=engine.model_sha256,
                     model_source=engine.model_source, reloads=engine.reloads)


@router.get("/metrics", response_class=Response)
def metrics(request: Request, _who: ApiCaller,
            gen: GenerationDep) -> Response:
    """Prometheus text format: requests and latency by route, index size and generation."""
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    m = request.app.state.metrics
    for kind, n in gen.counts.items():
        m.index_size.labels(kind=kind).set(n)
    m.generation.info({"id": gen.id})
    return Response(generate_latest(m.registry), media_type=CONTENT_TYPE_LATEST)
