"""The circuit explorer in a real headless Chromium (Debian's `chromium`, driven by Playwright),
against a real `circuit-catalog serve` process: what a person sees and clicks, checked against
the API's answers on the same catalog.

Skipped when /usr/bin/chromium is absent (`.ci/run` installs it). With CIRCUIT_CATALOG_SCREENSHOT=1
the circuit view's screenshot is written to docs/explorer.png (the README shows it).
"""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path

import httpx
import pytest

from catalog.testing.service import ServerProcess

CHROMIUM = Path("/usr/bin/chromium")
TOKEN = "explorer-token"
DOCS_SCREENSHOT = Path(__file__).resolve().parents[1] / "docs" / "explorer.png"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-dev-shm-usage"]

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="no /usr/bin/chromium (apt-get install chromium)")


@pytest.fixture(scope="module")
def served(catalog_db, tmp_path_factory):
    db = tmp_path_factory.mktemp("explorer") / "explorer.duckdb"
    shutil.copy(catalog_db, db)
    with ServerProcess(db, token=TOKEN) as server, httpx.Client(
            base_url=server.url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30) as api:
        yield server, api
        assert server.stop(sig=signal.SIGINT) == 130 and "stopped by SIGINT" in server.log(), server.log()  # Ctrl-C


@pytest.fixture(scope="module")
def browser_page(tmp_path_factory):
    sync_api = pytest.importorskip("playwright.sync_api")
    profile = tmp_path_factory.mktemp("chromium-profile")
    with sync_api.sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(profile), executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS,
            viewport={"width": 1280, "height": 860})
        yield context.new_page()
        context.close()


def cell_counts(page) -> dict[str, int]:
    return {cell.get_attribute("data-head"): int(cell.get_attribute("data-firings"))
            for cell in page.query_selector_all("td.cell")}


def test_from_the_grid_to_why_a_head_fires(served, browser_page, tmp_path):
    server, api = served
    page = browser_page
    requested = []
    page.on("request", lambda request: requested.append(request.url))
    page.goto(f"{server.url}/?token={TOKEN}")  # once with the token, then the cookie carries it
    page.wait_for_selector("td.cell")
    assert "token" not in page.url

    # The grid: one cell per head, coloured by its firings.
    grid = api.get("/api/v1/heads").json()
    assert cell_counts(page) == {f"L{h['layer']}H{h['head']}": h["n_firings"] for h in grid["heads"]}
    assert page.inner_text("#run-picker option:checked").startswith(f"run {grid['run_id']}:")

    # Which heads fire at `end`?
    page.select_option("#grid-dest", "end")
    at_end = api.get("/api/v1/heads", params={"dest_role": "end"}).json()["heads"]
    expected = {f"L{h['layer']}H{h['head']}": h["n_firings"] for h in at_end}
    page.wait_for_function("document.querySelector('#grid-dest').value === 'end' && "
                           "location.hash.includes('dest_role=end')")
    page.wait_for_function(f"document.querySelectorAll('td.cell[data-firings]').length === {len(expected)}")
    page.wait_for_timeout(200)
    assert cell_counts(page) == expected
    head = max((h for h in at_end if h["layer"] > 0), key=lambda h: (h["n_firings"], h["layer"]))
    name = f"L{head['layer']}H{head['head']}"   # heads are named L2H1 everywhere
    assert head["n_firings"] > 0

    # Its page.
    page.click(f'td.cell[data-head="{name}"]')
    page.wait_for_selector("#head-title")
    summary = api.get(f"/api/v1/heads/{name}", params={"top": 16}).json()
    assert page.inner_text("#head-title").startswith(f"Head {name}")
    assert f"{summary['activity'][0]['n_firings']} firings" in page.inner_text("#activity")
    assert len(page.query_selector_all("#spectrum rect.bar")) == len(summary["spectrum"])
    assert len(page.query_selector_all("#signal-size rect.bar")) == len(summary["signal_size"])
    assert int(page.get_attribute("#upstream table", "data-rows")) == len(summary["upstream"])
    assert [a.inner_text() for a in page.query_selector_all("#upstream a.head-link")] == \
        [r["upstream"] for r in summary["upstream"] if r["up_kind"] == "head"]
    assert int(page.get_attribute("#role-pairs table", "data-rows")) == len(summary["role_pairs"])
    # what the heads carry of each side (the edges explain no more than that)
    assert int(page.get_attribute("#side-shares table", "data-rows")) == len(summary["side_shares"]) >= 2
    assert page.inner_text("#side-shares").count("query") == len([r for r in summary["side_shares"] if r["side"] == "query"])
    # Its notes (rows left out, empty parts) are shown, not dropped.
    assert summary["notes"] and [li.inner_text() for li in page.query_selector_all("#head-notes li")] == summary["notes"]

    # Its strongest firing: the prompt, the sparse signal and the edges into it.
    strongest = api.get(f"/api/v1/heads/{name}/firings", params={"limit": 10}).json()
    assert len(page.query_selector_all("#firings a.firing-link")) == len(strongest) > 0
    page.click("#firings a.firing-link >> nth=0")
    page.wait_for_selector("#firing-title")
    f = strongest[0]
    detail = api.get(f"/api/v1/firings/{f['prompt_id']}/{name}/{f['dest_pos']}/{f['src_pos']}").json()
    assert len(page.query_selector_all("#signal tbody tr")) == len(detail["signal"]) == f["n_svs"]
    assert len(page.query_selector_all("#firing-edges tbody tr")) == len(detail["edges"])
    assert page.inner_text(".prompt .tok.dest") == f["dest_token"]
    page.go_back()
    page.wait_for_selector("#trace-button")

    # Why does it fire at `end`? The circuit, traced from it.
    assert page.input_value("#trace-dest") == "end"
    page.select_option("#trace-src", "any")
    page.click("#trace-button")
    page.wait_for_selector("#circuit svg")
    graph = api.get("/api/v1/trace", params={"roots": name, "dest_role": "end", "src_role": "any"}).json()
    assert len(page.query_selector_all("#circuit g.node")) == len(graph["nodes"])
    assert len(page.query_selector_all("#circuit path.edge")) == len(graph["edges"])
    writes = [e for e in graph["edges"] if e["kind"] == "writes"]
    assert writes and {e["side"] for e in writes} <= {"query", "key"}
    def style(side):  # (colour, dash pattern) of the side's edges
        return page.eval_on_selector(f"#circuit path.edge.{side}",
                                     "el => [getComputedStyle(el).stroke, getComputedStyle(el).strokeDasharray]")

    sides = {e["side"] for e in writes}
    if "key" in sides:
        assert style("key")[1] not in ("none", "")      # key side: dashed
    if "query" in sides:
        assert style("query")[1] in ("none", "")        # query side: solid
    if sides == {"query", "key"}:
        assert style("query")[0] != style("key")[0]     # and another colour

    # Hovering an edge shows its counts, weight and singular directions.
    edge = writes[0]
    selector = f'#circuit path.edge[data-source="{edge["source"]}"][data-target="{edge["target"]}"][data-side="{edge["side"]}"]'
    page.dispatch_event(selector, "mousemove", {"clientX": 300, "clientY": 300})
    tip = page.inner_text("#tooltip")
    assert f"{edge['source']} writes to {edge['target']}" in tip and f"count: {edge['count']} prompts" in tip
    assert "mean weight" in tip and (" ".join(f"{s['sv']}:{s['share']:.2f}" for s in edge["top_svs"]) or "none") in tip
    page.dispatch_event(selector, "mouseleave")

    # Clicking a token node pins its edges: the others fade.
    token = edge["target"]
    page.click(f'#circuit g.node[data-node="{token}"]')
    assert "pinned" in page.get_attribute(f'#circuit g.node[data-node="{token}"]', "class")
    dimmed = {(el.get_attribute("data-source"), el.get_attribute("data-target"))
              for el in page.query_selector_all("#circuit path.edge.dim")}
    incident = {(e["source"], e["target"]) for e in graph["edges"] if token in (e["source"], e["target"])}
    assert dimmed == {(e["source"], e["target"]) for e in graph["edges"]} - incident
    page.set_viewport_size({"width": 1280, "height": 760})
    page.dispatch_event(selector, "mousemove", {"clientX": 420, "clientY": 260})
    page.screenshot(path=str(tmp_path / "explorer.png"), full_page=True)
    if os.environ.get("CIRCUIT_CATALOG_SCREENSHOT"):
        shutil.copy(tmp_path / "explorer.png", DOCS_SCREENSHOT)

    # Pruning: each token node keeps its strongest upstream edge; the drawing is the API's pruned trace.
    page.fill("#c-top_k", "1")
    page.click("#c-trace")
    page.wait_for_function("location.hash.includes('top_k=1')")
    page.wait_for_selector("#circuit svg")
    pruned = api.get("/api/v1/trace", params={"roots": name, "dest_role": "end", "src_role": "any", "top_k": 1}).json()
    page.wait_for_function(f"document.querySelectorAll('#circuit path.edge').length === {len(pruned['edges'])}")
    assert len(pruned["edges"]) < len(graph["edges"]) and page.input_value("#c-top_k") == "1"
    assert all(note in page.inner_text("#circuit-notes") for note in pruned["notes"])
    page.go_back()
    page.wait_for_selector("#circuit svg")

    # Clicking an upstream head opens its page.
    upstream = edge["source"]
    page.click(f'#circuit g.node[data-node="{upstream}"]')
    page.wait_for_function(f"document.querySelector('#head-title')?.textContent.startsWith('Head {upstream}')")

    # Nothing came from anywhere but this server.
    assert requested and all(url.startswith(server.url) or url.startswith("data:") for url in requested), requested


def test_explorer_shows_a_one_line_error_for_bad_input(served, browser_page):
    server, _ = served
    page = browser_page
    page.goto(f"{server.url}/#/head/9.9")
    page.wait_for_selector("#error:not([hidden])")
    assert page.inner_text("#error") == "no head 9.9: the model has layers 0..2"


def test_jobs_view_lists_the_jobs_and_cancels_them(browser_page, tiny_checkpoint, tmp_path):
    from test_service_jobs import allow, submit

    page = browser_page
    with ServerProcess(tmp_path / "jobs.duckdb", token=TOKEN, args=allow(tiny_checkpoint)) as server, httpx.Client(
            base_url=server.url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30) as api:
        # One job generating 100,000 prompts (a while), one queued behind it.
        running = submit(api, model_path=str(tiny_checkpoint), n_prompts=100_000, batch_size=50_000)
        queued = submit(api, model_path=str(tiny_checkpoint), n_prompts=8, seed=3)
        deletes = []
        page.on("request", lambda r: deletes.append(r.url) if r.method == "DELETE" else None)
        page.goto(f"{server.url}/?token={TOKEN}")
        page.goto(f"{server.url}/#/jobs")
        page.wait_for_selector("#jobs tbody tr")

        def shown() -> dict[int, str]:
            return {int(tr.get_attribute("data-job")): tr.query_selector(".job-status").inner_text()
                    for tr in page.query_selector_all("#jobs tbody tr")}

        listed = {j["job_id"]: j["status"] for j in api.get("/api/v1/jobs").json()}
        page.wait_for_function(f"document.querySelectorAll('#jobs button.cancel').length === 2")
        assert set(shown()) == set(listed) == {running["job_id"], queued["job_id"]}

        # The queued job: cancelled at once, its button gone.
        page.click(f'#jobs button.cancel[data-job="{queued["job_id"]}"]')
        page.wait_for_function(f"document.querySelector('#jobs tr[data-job=\"{queued['job_id']}\"] .job-status')"
                               ".textContent === 'cancelled'")
        assert api.get(f"/api/v1/jobs/{queued['job_id']}").json()["status"] == "cancelled"
        # The running one stops at its next check; the view follows it by itself.
        page.click(f'#jobs button.cancel[data-job="{running["job_id"]}"]')
        page.wait_for_function(f"document.querySelector('#jobs tr[data-job=\"{running['job_id']}\"] .job-status')"
                               ".textContent === 'cancelled'", timeout=60_000)
        assert api.get(f"/api/v1/jobs/{running['job_id']}").json()["status"] == "cancelled"
        assert not page.query_selector_all("#jobs button.cancel")
        assert sorted(deletes) == sorted(f"{server.url}/api/v1/jobs/{j['job_id']}" for j in (running, queued))
        assert page.is_hidden("#error")
        assert server.stop(sig=signal.SIGINT) == 130, server.log()
