"""The service's JSON API, used as a client would: a real `circuit-catalog serve` process on a
loopback port, requests through an HTTP client, answers compared with the query functions (and
direct SQL) on an identical copy of the catalog that this process reads itself."""

from __future__ import annotations

import io
import shutil
import time

import duckdb
import httpx
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from _catalog_fixture import LATEST_RUN, OLDER_RUN, busiest_heads, fetch_dicts, invoke
from catalog.read import query
from catalog.testing.service import ServerProcess
from catalog.store import open_readonly
from catalog.read.trace import trace

TOKEN = "test-token-1234"


@pytest.fixture(scope="module")
def served(catalog_db, tmp_path_factory):
    """(server, client, reference): the service holds a copy of catalog_db; `reference` is the
    original file, which this test process reads directly (the served copy is locked)."""
    db = tmp_path_factory.mktemp("served") / "served.duckdb"
    shutil.copy(catalog_db, db)
    server = ServerProcess(db, token=TOKEN, args=("--sql-timeout", "1"))
    client = httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30)
    yield server, client, catalog_db
    client.close()
    assert server.stop() == 0, server.log()


@pytest.fixture(scope="module")
def reference(served):
    con = open_readonly(served[2])
    yield con
    con.close()


def rows(table) -> list[dict]:
    return table.to_pylist()


def assert_one_line_error(response, status: int) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and "\n" not in body["error"] and "Traceback" not in body["error"], body
    return body["error"]


def close(a, b) -> bool:
    return a == pytest.approx(b, rel=1e-6) if isinstance(a, float) else a == b


def assert_same_rows(api_rows: list[dict], expected: list[dict]) -> None:
    assert len(api_rows) == len(expected)
    for got, want in zip(api_rows, expected):
        assert set(got) == set(want)
        assert all(close(got[k], want[k]) for k in want), (got, want)


# -- the token -----------------------------------------------------------------------------------

def test_every_request_needs_the_token(served):
    server, client, _ = served
    for path in ("/api/v1/runs", "/openapi.json", "/", "/static/explorer.js"):
        assert_one_line_error(httpx.get(server.url + path), 401)
        assert_one_line_error(httpx.get(server.url + path, headers={"Authorization": "Bearer wrong"}), 401)
    assert client.get("/api/v1/runs").status_code == 200


def test_browser_opens_once_with_the_token_and_keeps_it_in_a_cookie(served):
    server, _, _ = served
    with httpx.Client(base_url=server.url) as browser:
        first = browser.get(f"/?token={TOKEN}")
        assert first.status_code == 303 and first.headers["location"] == "/"
        assert "httponly" in first.headers["set-cookie"].lower()
        page = browser.get("/")  # no token in the URL any more: the cookie carries it
        assert page.status_code == 200 and "circuit-catalog explorer" in page.text
        assert browser.get("/api/v1/runs").status_code == 200


def test_binds_to_loopback_and_serves_an_openapi_description(served):
    server, client, _ = served
    assert server.url.startswith("http://127.0.0.1:")
    spec = client.get("/openapi.json").json()
    for path in ("/api/v1/runs", "/api/v1/edges_into/{head}", "/api/v1/trace", "/api/v1/sql",
                 "/api/v1/firings/{prompt_id}/{head}/{dest_pos}/{src_pos}", "/api/v1/prompts/{prompt_id}"):
        assert path in spec["paths"]


# -- the query layer over HTTP -------------------------------------------------------------------

def test_runs_list_every_run_with_its_committed_progress(served, catalog_db):
    _, client, _ = served
    runs = client.get("/api/v1/runs").json()
    expected = fetch_dicts(catalog_db, """
        SELECT run_id, n_prompts, status, (SELECT sum(n_firings) FROM run_batches b WHERE b.run_id = r.run_id) AS firings,
               (SELECT sum(n_edges) FROM run_batches b WHERE b.run_id = r.run_id) AS edges
        FROM runs r ORDER BY run_id""")
    assert [r["run_id"] for r in runs] == [OLDER_RUN, LATEST_RUN]
    for got, want in zip(runs, expected):
        assert (got["n_prompts"], got["prompts_done"], got["status"]) == (want["n_prompts"], want["n_prompts"], "finished")
        assert (got["firings"], got["edges"]) == (want["firings"], want["edges"])
    one = client.get(f"/api/v1/runs/{OLDER_RUN}").json()
    assert one["progress"]["prompts_done"] == one["n_prompts"] == 4 and one["job"] is None


def test_edges_into_and_from_equal_the_query_functions(served, reference, catalog_db):
    _, client, _ = served
    head = busiest_heads(catalog_db)[0]
    got = client.get(f"/api/v1/edges_into/{head}", params={"side": "key", "top": 5}).json()
    assert_same_rows(got, rows(query.edges_into(reference, head, side="key", top=5)))
    # directions with their shares, as structured data
    assert got and all(set(sv) == {"sv", "share"} and isinstance(sv["sv"], int) for row in got for sv in row["top_svs"])
    assert all(row["upstream"] == f"L{row['up_layer']}H{row['up_head']}" for row in got if row["up_kind"] == "head")
    feeder = fetch_dicts(catalog_db, """SELECT up_layer || '.' || up_head AS up FROM edges
        WHERE run_id = ? AND up_head IS NOT NULL GROUP BY ALL ORDER BY count(*) DESC, up LIMIT 1""", [OLDER_RUN])[0]["up"]
    got = client.get(f"/api/v1/edges_from/{feeder}", params={"run_id": OLDER_RUN}).json()
    assert got
    assert_same_rows(got, rows(query.edges_from(reference, feeder, run_id=OLDER_RUN)))
    role = fetch_dicts(catalog_db, "SELECT role FROM tokens WHERE role IS NOT NULL LIMIT 1")[0]["role"]
    got = client.get(f"/api/v1/edges_into/{head}", params={"role": role, "n_svs": 2}).json()
    assert_same_rows(got, rows(query.edges_into(reference, head, role=role, n_svs=2)))
    got = client.get(f"/api/v1/edges_into/{head}", params={"effect": "true", "kind": "head"}).json()
    assert_same_rows(got, rows(query.edges_into(reference, head, effect=True, kind=["head"])))
    assert "mean_effect" in got[0]
    # by the firing's own roles (what feeds the head's firings from one role to another)
    got = client.get(f"/api/v1/edges_into/{head}", params={"dest_role": "end", "src_role": "IO"}).json()
    assert_same_rows(got, rows(query.edges_into(reference, head, dest_role="end", src_role="IO")))


def test_head_summary_and_grid(served, reference, catalog_db):
    _, client, _ = served
    head = busiest_heads(catalog_db)[0]
    got = client.get(f"/api/v1/heads/{head}", params={"top": 4}).json()
    expected = query.head_summary(reference, head, top=4)
    layer, index = (int(x) for x in head.split("."))
    assert (got["name"], got["layer"], got["head"], got["run_id"]) == (f"L{layer}H{index}", layer, index, LATEST_RUN)
    assert got["run"]["run_id"] == LATEST_RUN and isinstance(got["notes"], list)
    for name, table in expected.items():
        assert_same_rows(got[name], rows(table))
    # the heads' share of each side (2024 method), against medians of the stored side_shares rows
    medians = {r["side"]: r for r in fetch_dicts(catalog_db, """
        SELECT side, count(*) AS n, median(head_share) AS heads, median(mlp_share) AS mlps FROM side_shares
        WHERE run_id = ? AND layer = ? AND head = ? AND head_share IS NOT NULL GROUP BY side""",
        [LATEST_RUN, layer, index])}
    shown = {r["side"]: r for r in got["side_shares"] if r["firings"] == "all"}
    assert set(shown) == set(medians) == {"query", "key"}
    for side, row in shown.items():
        assert row["n_firings"] == medians[side]["n"]
        assert row["head_share"] == pytest.approx(medians[side]["heads"], abs=1e-6)
        assert row["mlp_share"] == pytest.approx(medians[side]["mlps"], abs=1e-6)
    grid = client.get("/api/v1/heads", params={"dest_role": "end"}).json()
    counts = {(r["layer"], r["head"]): r["n_firings"] for r in fetch_dicts(catalog_db, """
        SELECT layer, head, count(*) AS n_firings FROM firing_roles WHERE run_id = ? AND dest_role = 'end'
        GROUP BY ALL""", [LATEST_RUN])}
    assert len(grid["heads"]) == grid["n_layers"] * grid["n_heads"] == 12
    assert {(h["layer"], h["head"]): h["n_firings"] for h in grid["heads"] if h["n_firings"]} == counts


def test_trace_as_json_graphml_and_dot(served, reference, catalog_db):
    _, client, _ = served
    head = busiest_heads(catalog_db)[0]
    params = {"roots": head, "dest_role": "any", "src_role": "any"}
    got = client.get("/api/v1/trace", params=params).json()
    expected = trace(reference, roots=[head], dest_role=None, src_role=None)
    assert_same_rows(got["nodes"], rows(expected.nodes))
    assert_same_rows(got["edges"], rows(expected.edges))
    assert got["n_firings"] == expected.firings.num_rows > 0
    pruned = dict(min_count=2, min_weight=0.01, max_depth=2, top_k=2)
    small = client.get("/api/v1/trace", params=dict(params, **pruned)).json()
    expected_small = trace(reference, roots=[head], dest_role=None, src_role=None, **pruned)
    assert_same_rows(small["edges"], rows(expected_small.edges))
    assert 0 < len(small["edges"]) < len(got["edges"]) and small["notes"] == expected_small.notes
    # for drawing (the explorer asks with picture=true): the graph prune_for_picture gives
    from catalog.read.trace import prune_for_picture

    drawn = client.get("/api/v1/trace", params=dict(params, picture="true")).json()
    expected_drawn = prune_for_picture(expected)
    assert_same_rows(drawn["edges"], rows(expected_drawn.edges))
    assert drawn["notes"] == expected_drawn.notes
    assert client.get("/api/v1/trace", params=dict(params, top_k=0)).status_code == 422
    one = client.get("/api/v1/trace", params=dict(params, prompt_id=0)).json()
    assert_same_rows(one["edges"], rows(trace(reference, roots=[head], dest_role=None, src_role=None, prompt_id=0).edges))
    graphml = client.get("/api/v1/trace", params=dict(params, format="graphml"))
    assert "attachment" in graphml.headers["content-disposition"]
    import networkx as nx

    g = nx.read_graphml(io.BytesIO(graphml.content))
    assert set(g.nodes) == {n["node"] for n in got["nodes"]}
    dot = client.get("/api/v1/trace", params=dict(params, format="dot")).text
    layer, index = head.split(".")
    assert dot.lstrip().startswith("digraph") and f'"L{layer}H{index}"' in dot


def test_a_firing_with_its_sparse_signal(served, catalog_db):
    _, client, _ = served
    f = fetch_dicts(catalog_db, """SELECT * FROM firings WHERE run_id = ? AND layer = 2
        ORDER BY n_svs DESC, prompt_id, head, dest_pos, src_pos LIMIT 1""", [LATEST_RUN])[0]
    head = f"{f['layer']}.{f['head']}"
    got = client.get(f"/api/v1/firings/{f['prompt_id']}/{head}/{f['dest_pos']}/{f['src_pos']}").json()
    assert got["firing"]["score"] == pytest.approx(f["score"]) and got["firing"]["n_svs"] == f["n_svs"]
    signal = fetch_dicts(catalog_db, """SELECT rank, sv, contribution FROM firing_svs WHERE run_id = ? AND prompt_id = ?
        AND layer = ? AND head = ? AND dest_pos = ? AND src_pos = ? ORDER BY rank""",
                         [LATEST_RUN, f["prompt_id"], f["layer"], f["head"], f["dest_pos"], f["src_pos"]])
    assert [(s["rank"], s["sv"]) for s in got["signal"]] == [(s["rank"], s["sv"]) for s in signal]
    assert [s["contribution"] for s in got["signal"]] == pytest.approx([s["contribution"] for s in signal])
    assert sum(s["share"] for s in got["signal"]) == pytest.approx(1.0)
    n_edges = fetch_dicts(catalog_db, """SELECT count(*) AS n FROM edges WHERE run_id = ? AND prompt_id = ?
        AND layer = ? AND head = ? AND dest_pos = ? AND src_pos = ?""",
                          [LATEST_RUN, f["prompt_id"], f["layer"], f["head"], f["dest_pos"], f["src_pos"]])[0]["n"]
    assert len(got["edges"]) == n_edges > 0


def test_a_prompt_with_its_tokens_and_roles(served, catalog_db):
    _, client, _ = served
    got = client.get("/api/v1/prompts/3", params={"run_id": OLDER_RUN}).json()
    tokens = fetch_dicts(catalog_db, "SELECT pos, token, role FROM tokens WHERE run_id = ? AND prompt_id = 3 ORDER BY pos",
                         [OLDER_RUN])
    assert [(t["pos"], t["token"], t["role"]) for t in got["tokens"]] == [(t["pos"], t["token"], t["role"]) for t in tokens]
    assert {"IO", "S1", "S2", "end"} <= {t["role"] for t in got["tokens"]}
    assert got["prompt"]["text"].startswith("".join(t["token"] for t in tokens[:3]))


def test_answers_are_kept_until_something_writes(served):
    _, client, _ = served
    path = "/api/v1/edges_into/2.1?top=2&n_svs=1"
    first, second = client.get(path), client.get(path)
    assert (first.headers["x-cache"], second.headers["x-cache"]) == ("miss", "hit")
    assert first.json() == second.json()
    fresh = client.get(path, headers={"Cache-Control": "no-cache"})
    assert "x-cache" not in fresh.headers and fresh.json() == first.json()
    assert "x-cache" not in client.get("/api/v1/runs").headers  # live progress is never kept
    assert client.get("/api/v1/edges_into/9.9").status_code == client.get("/api/v1/edges_into/9.9").status_code == 400
    assert client.get("/api/v1/edges_into/9.9").headers["x-cache"] == "miss"  # errors are not kept


@pytest.mark.parametrize("path, params, status, words", [
    ("/api/v1/edges_into/9.9", {}, 400, "no head 9.9"),
    ("/api/v1/edges_into/nine", {}, 400, "not a head"),
    ("/api/v1/edges_into/2.1", {"run_id": 99}, 404, "no run 99"),
    ("/api/v1/edges_into/2.1", {"role": "hero"}, 400, "role 'hero'"),
    ("/api/v1/edges_into/2.1", {"side": "left"}, 400, "side must be"),
    ("/api/v1/edges_into/2.1", {"top": "many"}, 422, "top"),
    ("/api/v1/trace", {"roots": "2.1", "format": "svg"}, 400, "format"),
    ("/api/v1/trace", {"roots": "2.1", "prompt_id": 500}, 404, "no prompt 500"),
    ("/api/v1/trace", {"dest_role": "S1", "src_role": "end"}, 400, "--root"),  # no roots from the data
    ("/api/v1/edges_into/2.1", {"dest_role": "hero"}, 400, "role 'hero'"),
    ("/api/v1/runs/77", {}, 404, "no run 77"),
    ("/api/v1/prompts/500", {}, 404, "no prompt 500"),
    ("/api/v1/firings/0/2.1/0/0", {}, 404, "no firing"),
    ("/api/v1/jobs/5", {}, 404, "no ingest job 5"),
    ("/api/v1/nothing-here", {}, 404, "Not Found"),
])
def test_bad_input_is_a_4xx_with_one_line(served, path, params, status, words):
    _, client, _ = served
    assert words in assert_one_line_error(client.get(path, params=params), status)


# Every route that names a run, a job or a prompt, with one the catalog does not hold.
UNKNOWN_IDS = [
    ("GET", "/api/v1/runs/77", {}, "no run 77"),
    ("DELETE", "/api/v1/runs/77", {}, "no run 77"),
    ("POST", "/api/v1/runs/77/resume", {}, "no run 77"),
    ("GET", "/api/v1/jobs/77", {}, "no ingest job 77"),
    ("DELETE", "/api/v1/jobs/77", {}, "no ingest job 77"),
    ("GET", "/api/v1/heads", {"run_id": 77}, "no run 77"),
    ("GET", "/api/v1/heads/2.1", {"run_id": 77}, "no run 77"),
    ("GET", "/api/v1/heads/2.1/firings", {"run_id": 77}, "no run 77"),
    ("GET", "/api/v1/edges_into/2.1", {"run_id": 77}, "no run 77"),
    ("GET", "/api/v1/edges_from/2.1", {"run_id": 77}, "no run 77"),
    ("GET", "/api/v1/trace", {"roots": "2.1", "run_id": 77}, "no run 77"),
    ("GET", "/api/v1/trace", {"roots": "2.1", "prompt_id": 500}, "no prompt 500"),
    ("GET", "/api/v1/firings/0/2.1/0/0", {"run_id": 77}, "no run 77"),
    ("GET", "/api/v1/firings/500/2.1/0/0", {}, "no firing"),
    ("GET", "/api/v1/prompts", {"run_id": 77}, "no run 77"),
    ("GET", "/api/v1/prompts/500", {}, "no prompt 500"),
    ("GET", "/api/v1/prompts/0", {"run_id": 77}, "no run 77"),
    ("GET", "/api/v1/roles", {"run_id": 77}, "no run 77"),
]


@pytest.mark.parametrize("method, path, params, words", UNKNOWN_IDS)
def test_an_unknown_run_job_or_prompt_is_404_with_one_line(served, method, path, params, words):
    server, client, _ = served
    error = assert_one_line_error(client.request(method, path, params=params), 404)
    assert words in error and str(server.db_path) not in error, error


def test_cancelling_a_known_run_without_a_job_is_400(served):
    _, client, _ = served
    error = assert_one_line_error(client.delete(f"/api/v1/runs/{OLDER_RUN}"), 400)
    assert "nothing to cancel" in error, error


# -- SQL ------------------------------------------------------------------------------------------

def sql(client, text: str, **extra):
    return client.post("/api/v1/sql", json={"sql": text, **extra})


def test_sql_answers_as_json_csv_arrow_and_parquet(served, catalog_db):
    _, client, _ = served
    text = "SELECT run_id, count(*) AS n FROM firings GROUP BY run_id ORDER BY run_id"
    expected = fetch_dicts(catalog_db, text)
    body = sql(client, text).json()
    assert body["rows"] == expected and body["truncated"] is False and body["columns"] == ["run_id", "n"]
    assert sql(client, text, format="csv").text.splitlines() == ["run_id,n"] + [f"{r['run_id']},{r['n']}" for r in expected]
    arrow = pa.ipc.open_stream(sql(client, text, format="arrow").content).read_all()
    assert arrow.to_pylist() == expected
    assert pq.read_table(io.BytesIO(sql(client, text, format="parquet").content)).to_pylist() == expected


def test_sql_row_limit_and_time_limit(served):
    _, client, _ = served
    response = sql(client, "SELECT * FROM firings", max_rows=7)
    assert response.json()["n_rows"] == 7 and response.json()["truncated"] is True
    assert response.headers["x-truncated"] == "true"
    started = time.monotonic()
    slow = sql(client, "SELECT count(*) FROM range(20000000) a, range(2000) b WHERE (a.range * b.range) % 7 = 1")
    assert "time limit" in assert_one_line_error(slow, 408)
    assert time.monotonic() - started < 8
    assert sql(client, "SELECT 1 AS one").json()["rows"] == [{"one": 1}]  # the service is still fine


def test_sql_runs_one_statement_per_call_as_the_sql_command(served):
    _, client, _ = served
    message = assert_one_line_error(sql(client, "SELECT 1; SELECT 2"), 400)
    assert "one statement per call" in message
    assert sql(client, "SELECT 2 AS two;").json()["rows"] == [{"two": 2}]  # a trailing ; is fine


@pytest.mark.parametrize("text", [
    "SELECT * FROM read_text('/etc/passwd')",
    "SELECT * FROM read_csv('/etc/passwd')",
    "SELECT * FROM glob('/*')",
    "ATTACH '/tmp/other.duckdb' AS other",
    "COPY firings TO '/tmp/leak.csv'",
    "INSTALL httpfs",
    "LOAD httpfs",
    "DELETE FROM firings",
    "CREATE TABLE x AS SELECT 1",
    "SET enable_external_access = true",
    "PRAGMA threads = 1",
    "SELECT 1; DROP TABLE firings",
])
def test_sql_is_read_only_and_sees_nothing_but_the_catalog(served, text):
    _, client, _ = served
    message = assert_one_line_error(sql(client, text), 400)
    assert "refused" in message or "Permission" in message or "disabled" in message, message
    assert sql(client, "SELECT count(*) AS n FROM firings").json()["rows"][0]["n"] > 0


# -- the file is held ------------------------------------------------------------------------------

def test_cli_on_a_held_catalog_stops_at_once_and_says_how_to_submit(served):
    server, _, _ = served
    started = time.monotonic()
    result = invoke("ingest", "--db", server.db_path, "--model-path", "/nonexistent", "--n-prompts", "2")
    assert result.exit_code == 1 and time.monotonic() - started < 10
    line = result.output.strip()
    assert "\n" not in line and server.url in line and "--server" in line, result.output
    with pytest.raises(duckdb.Error):  # and it really is held: DuckDB refuses this process
        duckdb.connect(str(server.db_path), read_only=True)
