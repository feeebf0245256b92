"""The service's answers are bounded, and nothing is cut silently: a list or trace larger than the
limit is refused with a line saying how to ask for less; a list the client limited says in its
headers whether rows were left out. The app runs in this process with the limits made small, so
the test catalog's answers cross them; the expected sizes come from the query functions."""

from __future__ import annotations

import shutil

import pytest
from fastapi.testclient import TestClient

from _catalog_fixture import LATEST_RUN, busiest_heads
from catalog.read import query
from catalog.read.trace import trace
from catalog.service import api
from catalog.store import open_readonly

LIMIT = 3


@pytest.fixture(scope="module")
def bounded(catalog_db, tmp_path_factory):
    from catalog.service.app import create_app
    from catalog.service.connection import ServiceCatalog

    db = tmp_path_factory.mktemp("bounds") / "bounds.duckdb"
    shutil.copy(catalog_db, db)
    service = ServiceCatalog(db)
    patch = pytest.MonkeyPatch()
    patch.setattr(api, "MAX_LIST_ROWS", LIMIT)
    patch.setattr(api, "MAX_TRACE_ELEMENTS", LIMIT)
    reference = open_readonly(catalog_db)
    try:
        with TestClient(create_app(service, resume=False), base_url="http://127.0.0.1") as client:
            yield client, reference
    finally:
        patch.undo()
        reference.close()
        service.close()


def one_line(response, status: int) -> str:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert "\n" not in error
    return error


def test_a_list_larger_than_the_limit_is_refused_saying_how_to_ask_for_less(bounded, catalog_db):
    client, reference = bounded
    head = busiest_heads(catalog_db)[0]
    whole = query.edges_into(reference, head)
    assert whole.num_rows > LIMIT  # else the test would prove nothing
    error = one_line(client.get(f"/api/v1/edges_into/{head}"), 413)
    assert f"more than {LIMIT} rows" in error and "top=N" in error
    strongest = client.get(f"/api/v1/edges_into/{head}", params={"top": LIMIT})
    assert strongest.status_code == 200
    assert [r["upstream"] for r in strongest.json()] == whole.column("upstream").to_pylist()[:LIMIT]
    # top may not ask for more than the limit (the route's own bound is the real limit, 10,000)
    assert "top" in one_line(client.get(f"/api/v1/edges_into/{head}", params={"top": 10_001}), 422)

    feeder = whole.column("upstream").to_pylist()[0]
    downstream = query.edges_from(reference, feeder)
    response = client.get(f"/api/v1/edges_from/{feeder}")
    if downstream.num_rows > LIMIT:
        assert "top=N" in one_line(response, 413)
    else:
        assert len(response.json()) == downstream.num_rows


def test_a_trace_larger_than_the_limit_is_refused_saying_how_to_prune(bounded, catalog_db):
    client, reference = bounded
    head = busiest_heads(catalog_db)[0]
    graph = trace(reference, roots=[head], dest_role="end", src_role=None)
    assert graph.edges.num_rows > LIMIT
    error = one_line(client.get("/api/v1/trace", params={"roots": head, "dest_role": "end", "src_role": "any"}), 413)
    assert f"{graph.edges.num_rows} edges" in error and "prune" in error
    for download in ("graphml", "dot"):  # the downloads too
        response = client.get("/api/v1/trace", params={"roots": head, "dest_role": "end", "src_role": "any",
                                                       "format": download})
        assert response.status_code == 413


def test_a_list_the_client_limited_says_what_it_left_out(bounded, catalog_db):
    client, reference = bounded
    n = reference.execute("SELECT count(*) FROM prompts WHERE run_id = ?", [LATEST_RUN]).fetchall()[0][0]
    cut = client.get("/api/v1/prompts", params={"limit": n - 1})
    assert len(cut.json()) == n - 1 and cut.headers["X-Truncated"] == "true" and cut.headers["X-Row-Count"] == str(n - 1)
    whole = client.get("/api/v1/prompts", params={"limit": n})
    assert len(whole.json()) == n and whole.headers["X-Truncated"] == "false"

    head = busiest_heads(catalog_db)[0]
    layer, index = (int(part) for part in head.split("."))
    fired = reference.execute("SELECT count(*) FROM firing_roles WHERE run_id = ? AND layer = ? AND head = ?",
                              [LATEST_RUN, layer, index]).fetchall()[0][0]
    assert fired > 1
    cut = client.get(f"/api/v1/heads/{head}/firings", params={"limit": fired - 1})
    assert len(cut.json()) == fired - 1 and cut.headers["X-Truncated"] == "true"
    whole = client.get(f"/api/v1/heads/{head}/firings", params={"limit": fired})
    assert len(whole.json()) == fired and whole.headers["X-Truncated"] == "false"
