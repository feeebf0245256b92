"""Query commands: edges, head, trace, export. Parsing and output only; the answers come from
catalog.read.query and catalog.read.trace (Arrow tables), pictures from catalog.formats.graph.

Imports neither torch nor pandas: these commands must answer in well under a second.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import click

from catalog.read import query
from catalog.errors import CatalogError
from catalog.cli.output import TRACE_FORMATS, format_from_out, format_option
from catalog.formats import TEXT_TABLE_FORMATS as FORMATS
from catalog.formats.table import render
from catalog.store import open_readonly
from catalog.read.trace import DEFAULTS as TRACE_DEFAULTS
from catalog.read.trace import PICTURE_EDGES, prune_for_picture
from catalog.read.trace import trace as trace_circuit  # renamed: `trace` is the command below

db_option = click.option("--db", "db_path", required=True, metavar="PATH", help="The catalog file (DuckDB).")
run_option = click.option("--run", "run_id", type=int, default=None,
                          help="Run id. Default: the latest finished run.")


@contextmanager
def _catalog(db_path: str):
    con = open_readonly(db_path)
    try:
        yield con
    finally:
        con.close()


def _emit(text: str, out: str | None = None) -> None:
    if out is None:
        click.echo(text)
    else:
        Path(out).write_text(text if text.endswith("\n") else text + "\n", encoding="utf-8")


def _notes(run: dict | None, notes: list[str]) -> None:
    """The run a result was read from, and its notes, on stderr (stdout stays machine-readable)."""
    if run:
        click.echo(f"note: {query.run_line(run)}", err=True)
    for note in notes:
        click.echo(f"note: {note}", err=True)


SVS_HELP = ("top_svs lists the singular directions of the downstream head that the edges write through, "
            "largest first, as {sv, share} (table: sv:share): " + query.SHARE_MEANING + "; on a rotary model "
            "{pos_offset, sv, share} (table: d3:sv0:share), the same sv at two offsets being two directions.")


def effect_options(command):
    """--effect, --min-effect X, --effect-mode: the measured effect of edges (`circuit-catalog intervene`)."""
    command = click.option("--effect-mode", type=click.Choice(query.EFFECT_MODES), default=TRACE_DEFAULTS.effect_mode,
                           show_default=True, help="Which interventions the effect is read from.")(command)
    command = click.option("--min-effect", type=float, default=None, metavar="X",
                           help="Only rows whose mean effect (attention drop when ablated) is >= X; implies --effect.")(command)
    return click.option("--effect", is_flag=True,
                        help="Add mean_effect: the mean drop of the downstream attention when the edges are ablated "
                             "(stored by `intervene`), and n_tested.")(command)


@click.command()
@db_option
@click.option("--into", "into_head", metavar="L.H", help="Which heads feed this head (L9H9, or 9.9)?")
@click.option("--from", "from_head", metavar="L.H", help="Which heads, sides and token roles does this head feed?")
@click.option("--side", type=click.Choice(query.SIDES), help="Only edges on this side of the downstream head.")
@click.option("--role", help="Only edges whose token (the one the upstream head writes to) has this role.")
@click.option("--dest-role", default=None,
              help="Only edges into firings whose own destination token has this role (as trace's --dest-role).")
@click.option("--src-role", default=None,
              help="Only edges into firings whose own source token has this role (as trace's --src-role).")
@run_option
@click.option("--top", type=click.IntRange(min=1), help="Keep the first N rows.")
@click.option("--kind", "kinds", metavar="KIND,...",
              help="ACC++ runs: only upstream components of these kinds (head, mlp, attn_bias, embed, offset).")
@effect_options
@click.option("--features", "n_features", type=click.IntRange(min=1), default=None, metavar="N",
              help="Add the N SAE features that carry most of each row's edges, and the share the SAE does not "
                   "reconstruct (stored by `circuit-catalog features`, docs/features.md).")
@format_option()
def edges(db_path, into_head, from_head, side, role, dest_role, src_role, run_id, top, kinds, effect, min_effect, effect_mode,
          n_features, fmt):
    """Upstream heads of --into HEAD, or downstream heads of --from HEAD, with counts and weights.

    One row per head (and side; and token role for --from): its display name (upstream or
    downstream: L6H10, or MLP 3, b_O 3, embed, offset on ACC++ runs) and integer columns
    (up_kind, up_layer, up_head; down_layer, down_head), the prompts and firings it is an edge
    of, its mean and total edge weight, and the singular directions it writes through, most
    frequent first.

    {svs} stderr names the run read, rows left out (--top, --min-effect) and why an empty answer is
    empty.

    Example: circuit-catalog edges --db ioi.duckdb --into 9.9 --side query --role end --format csv
    """
    if (into_head is None) == (from_head is None):
        raise CatalogError("give exactly one of --into HEAD or --from HEAD")
    with _catalog(db_path) as con:
        if into_head is not None:
            table = query.edges_into(con, into_head, side=side, role=role, run_id=run_id, top=top, kind=kinds,
                                     dest_role=dest_role, src_role=src_role, effect=effect, min_effect=min_effect, effect_mode=effect_mode)
        else:
            table = query.edges_from(con, from_head, side=side, role=role, run_id=run_id, top=top,
                                     dest_role=dest_role, src_role=src_role, effect=effect, min_effect=min_effect, effect_mode=effect_mode)
        if n_features is not None:
            table = _with_features(con, table, run_id, into_head or from_head, "into" if into_head else "from", side,
                                   role, dest_role, src_role, n_features)
    _notes(query.result_run(table), query.result_notes(table))
    click.echo(render(table, fmt))





def _with_features(con, table, run_id, head_text, direction, side, role, dest_role, src_role, n):
    from catalog.read.features import has_features, with_top_features

    run = query.resolve_run(con, run_id)
    if not has_features(con, run):
        raise CatalogError(f"run {run.run_id} has no edge features: store them with `circuit-catalog features "
                           "--sae DIR` first (docs/features.md)")
    return with_top_features(con, table, run, head_text, direction, side, role, dest_role, src_role, n)


HEAD_TITLES = {
    "spectrum": "Spectrum: top singular values",
    "activity": "Firings",
    "role_pairs": "Firing token roles (dest_role -> src_role)",
    "signal_size": "Signal size (n_svs histogram)",
    "top_svs": "Most used singular vectors",
    "side_shares": "Who writes each side (median share of the sparse signal's projection)",
    "upstream": "Main upstream heads",
    "downstream": "Main downstream heads",
    "features": "SAE features carrying its upstream edges",
    "qk_pairs": "QK feature pairs carrying its firings (query feature x key feature)",
}


@click.command()
@db_option
@click.argument("head_name", metavar="HEAD")
@run_option
@click.option("--top", type=click.IntRange(min=1), default=10, show_default=True, help="Rows per table.")
@effect_options
@click.option("--features", "with_features", is_flag=True,
              help="Add the SAE features that carry its upstream edges (stored by `circuit-catalog features`).")
@format_option()
def head(db_path, head_name, run_id, top, effect, min_effect, effect_mode, with_features, fmt):
    """Everything about one HEAD (L9H9 or 9.9): spectrum, firings, token roles, signal size, neighbours.

    With --format json, one object: name ("L9H9"), layer, head, run_id, run, notes, and one list
    of rows per table (spectrum, activity, role_pairs, signal_size, top_svs, side_shares (2024
    method: how much of each side upstream heads, MLPs, biases and the embedding write), upstream,
    downstream). The upstream/downstream rows are those of `edges`. {svs}
    """
    with _catalog(db_path) as con:
        run = query.resolve_run(con, run_id)
        tables = query.head_summary(con, head_name, run_id=run.run_id, top=top, effect=effect, min_effect=min_effect,
                                    effect_mode=effect_mode)
        features, pairs = _head_features(con, run, head_name, top) if with_features else (None, None)
        if fmt == "json":  # one object: the head, its run and notes, then one list of rows per table
            document = query.head_document(con, head_name, run_id=run.run_id, top=top,
                                           rows_of=lambda table: json.loads(render(table, "json")), effect=effect,
                                           min_effect=min_effect, effect_mode=effect_mode)
            if features is not None:
                document["features"] = json.loads(render(features, "json"))
                document["qk_pairs"] = json.loads(render(pairs, "json"))
            _notes(document["run"], document["notes"])
            click.echo(json.dumps(document, indent=2))
            return
    layer, head_index = run.head(head_name)
    name = query.head_name(layer, head_index)
    if features is not None:
        tables.update(features=features, qk_pairs=pairs)
    _notes(query.result_run(tables["upstream"]), query.head_notes(run, name, tables)
           + (query.result_notes(features) + query.result_notes(pairs) if features is not None else []))
    blocks = []
    for key, table in tables.items():
        title = f"{HEAD_TITLES[key]} ({name}, run {run.run_id})"
        blocks.append(f"# {title}\n{render(table, fmt)}" if fmt == "csv" else f"{title}\n{render(table, fmt)}")
    click.echo("\n\n".join(blocks))


def _head_features(con, run, head_text, top):
    from catalog.read.features import has_features, has_pairs, head_features, head_pairs

    if not has_features(con, run) and not has_pairs(con, run):
        raise CatalogError(f"run {run.run_id} has no features: store them with `circuit-catalog features "
                           "--sae DIR` (or --qk DIR) first (docs/features.md)")
    return head_features(con, run, head_text, top), head_pairs(con, run, head_text, top)


ANY_ROLE = "any"
PICTURE_FORMATS = ("html", "png")  # drawn: pruned automatically when large (--all-edges: not)


@click.command()
@db_option
@click.option("--root", "roots", multiple=True, metavar="L.H",
              help="Root head (repeatable, or comma-separated). Default: GPT-2's 9.6, 9.9, 10.0 where the "
                   "model has them and they fire between the roles; else the 3 heads firing between the "
                   "roles in most prompts (a note names them).")
@click.option("--dest-role", default=TRACE_DEFAULTS.dest_role, show_default=True, help=f"Role of the roots' destination token ('{ANY_ROLE}': any).")
@click.option("--src-role", default=TRACE_DEFAULTS.src_role, show_default=True, help=f"Role of the roots' source token ('{ANY_ROLE}': any).")
@click.option("--prompt", "prompt_id", type=int, default=None,
              help="Trace one prompt (nodes keep positions). Default: every prompt, aggregated by token role.")
@run_option
@click.option("--kind", "kinds", metavar="KIND,...",
              help="ACC++ runs: only components of these kinds (head, mlp, attn_bias, embed, offset).")
@effect_options
@click.option("--min-count", type=click.IntRange(min=1), default=None, metavar="N",
              help="Prune: only edges in at least N prompts (with --prompt: N firings).")
@click.option("--min-weight", type=click.FloatRange(min=0), default=None, metavar="W",
              help="Prune: only edges whose |mean weight| is at least W.")
@click.option("--max-depth", type=click.IntRange(min=0), default=None, metavar="D",
              help="Prune: only what is at most D upstream steps from a root (1: the roots' direct inputs).")
@click.option("--top-k", type=click.IntRange(min=1), default=None, metavar="K",
              help="Prune: each node written to (a token node; ACC++: a firing or the output) keeps its K "
                   "strongest upstream edges (most prompts, then largest |mean weight|).")
@format_option(TRACE_FORMATS)
@click.option("--out", type=click.Path(dir_okay=False),
              help="Output file (required for png; default stdout). Without --format, its extension picks the format.")
@click.option("--all-edges", is_flag=True,
              help=f"png and html: draw every edge (by default a picture of over {PICTURE_EDGES} weighted edges is "
                   "pruned to the strongest, with a note).")
def trace(db_path, roots, dest_role, src_role, prompt_id, run_id, kinds, effect, min_effect, effect_mode,
          min_count, min_weight, max_depth, top_k, fmt, out, all_edges):
    """Trace the circuit behind root heads, recursively over the stored firings and edges.

    On an ACC++ run (ingest --method accpp) it draws the stored circuit instead, rooted at the
    model's output: seeds -> root, firings L9H9@dest>src, and MLP / b_O / embed / offset leaves;
    --root and the roles do not apply, and without --prompt the prompts' circuits are combined.

    Nodes are heads L9H9 and token nodes L9H9@role (L9H9@pos with --prompt; over all prompts a
    token without a role is L9H9@other, never matched by position across prompts); an edge goes
    from an upstream head to the token node it writes to, labelled with side, count (prompts; firings with
    --prompt), mean weight and singular directions. Every edge row also has up_kind, up_layer,
    up_head, down_layer, down_head (integers) and token.

    {svs}

    --format json is one object: run_id, run, prompt_id, roots, dest_role, src_role, notes,
    n_firings, nodes, edges. csv and table give the edges. stderr names the run and ends with a
    summary line (firings reached, nodes, edges, what pruning left out).

    Example: circuit-catalog trace --db ioi.duckdb --root 9.9 --top-k 3 --format png --out c.png
    """
    root_list = [part.strip() for text in roots for part in text.split(",") if part.strip()] or None
    fmt = format_from_out(fmt, out, TRACE_FORMATS)
    if fmt == "png" and out is None:
        raise CatalogError("--format png needs --out FILE.png")
    with _catalog(db_path) as con:
        graph = trace_circuit(con, roots=root_list,
                              dest_role=None if dest_role == ANY_ROLE else dest_role,
                              src_role=None if src_role == ANY_ROLE else src_role,
                              prompt_id=prompt_id, run_id=run_id, kinds=kinds, effect=effect,
                              min_effect=min_effect, effect_mode=effect_mode, min_count=min_count,
                              min_weight=min_weight, max_depth=max_depth, top_k=top_k)
    if fmt in PICTURE_FORMATS and not all_edges:
        graph = prune_for_picture(graph)
    _notes(graph.run, [n for n in graph.notes if not n.startswith("pruned")])
    if fmt == "json":
        _emit(json.dumps(graph.document(lambda table: json.loads(render(table, "json"))), indent=2), out)
    elif fmt in FORMATS:
        _emit(render(graph.edges, fmt), out)
    if fmt in FORMATS:
        click.echo(f"note: {graph.summary()}" + (f" -> {out}" if out else ""), err=True)
        return
    # Imported here: only the picture formats need it (and it pulls in networkx or matplotlib lazily).
    from catalog.formats.graph import render_graph

    from catalog.formats.graph import drawing_notes

    _notes(None, drawing_notes(graph) if fmt in PICTURE_FORMATS else [])
    text = render_graph(graph, fmt, out)
    if text is not None:
        _emit(text, out)
    click.echo((f"wrote {out}: " if out is not None else "note: ") + graph.summary(), err=True)


@click.command()
@db_option
@click.option("--format", "fmt", type=click.Choice(["parquet"]), default="parquet", show_default=True)
@click.option("--force", is_flag=True, help="Write into OUT_DIR although it holds files (overwrites the tables).")
@click.argument("out_dir", type=click.Path(file_okay=False))
def export(db_path, fmt, force, out_dir):
    """Write every table of the catalog to OUT_DIR/<table>.parquet (a new or empty directory, or --force)."""
    with _catalog(db_path) as con:
        written = query.export_parquet(con, out_dir, force=force)
    click.echo(render(written, "table"))


edges.help = edges.help.replace("{svs}", SVS_HELP)
trace.help = trace.help.replace("{svs}", SVS_HELP)
head.help = head.help.replace("{svs}", SVS_HELP)
COMMANDS = [edges, head, trace, export]
