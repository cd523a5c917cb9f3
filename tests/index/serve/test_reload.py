"""A live index: studies are added while the server answers; no query fails or mixes two generations."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from index.build import BuildOptions, build
from tests.helpers.index_data import copy_archive, ground_truth

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.slow]


def test_generation_reload_during_queries(pacs_archive: Path, tiny_model, tmp_path: Path, make_client) -> None:
    from cxr_search.inference import Embedder
    from index.serve.engine import Engine

    gt = ground_truth(pacs_archive)
    patients = sorted({r["patient_id"] for r in gt})
    first = set(patients[: len(patients) // 2])
    part_a = copy_archive(pacs_archive, tmp_path / "a", {r["path"] for r in gt if r["patient_id"] in first})
    part_b = copy_archive(pacs_archive, tmp_path / "b", {r["path"] for r in gt if r["patient_id"] not in first})
    index = tmp_path / "index"
    build(part_a, index, tiny_model, BuildOptions(reports_csv=part_a / "reports.csv", batch_size=8))

    engine = Engine(index, Embedder(tiny_model), text_precision="fp32", reload_check_s=0.0)
    ids_of = {engine.current().id: set(engine.current().ids("image").tolist())}
    load = engine._load

    def recording_load():
        gen = load()
        if gen is not None:
            ids_of[gen.id] = set(gen.ids("image").tolist())
        return gen

    engine._load = recording_load  # every generation the server loads, with the image ids its FAISS file holds
    client = make_client(eng=engine, reload_check_s=0.0)
    first_gen = engine.current().id
    errors = []

    def add() -> None:
        try:
            build(part_b, index, tiny_model, BuildOptions(reports_csv=part_b / "reports.csv", batch_size=4),
                  command="add")
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    writer = threading.Thread(target=add)
    writer.start()
    answers = []
    deadline = time.monotonic() + 180
    after = 0
    while after < 3 and len(answers) < 400 and time.monotonic() < deadline:  # bounded loop
        if not writer.is_alive():
            after += 1
        text = client.post("/api/search/text", json={"query": "pleural effusion", "k": 50})
        assert text.status_code == 200, text.text
        answers.append(text.json())
        like = client.post("/api/search/image", json={"image_id": 1, "k": 50, "include_same_patient": True})
        assert like.status_code == 200, like.text
        answers.append(like.json())
    writer.join(timeout=60)
    assert not errors, errors
    assert not writer.is_alive()
    gens = [a["index_generation"] for a in answers]
    assert gens[0] == first_gen and gens[-1] != first_gen, "the new generation was not picked up"
    for a in answers:
        ids = {h["image_id"] for h in a["hits"]}
        assert ids <= ids_of[a["index_generation"]], "a response mixed two generations"
        assert len(a["hits"]) == min(50, len(ids_of[a["index_generation"]]))  # nothing half-added or dropped
    assert len(ids_of[gens[-1]]) > len(ids_of[first_gen])
    health = client.get("/healthz").json()
    assert health["index_generation"] == gens[-1] and health["reloads"] >= 1
    assert health["counts"]["images"] == len(ids_of[gens[-1]])
    engine.close()
