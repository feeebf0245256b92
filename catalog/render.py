"""Pictures and exports of a traced circuit (catalog.trace.TraceGraph): GraphML, DOT, HTML, PNG.

Every drawing uses one layout: y = layer (layer 0 at the bottom, information flows up), the
heads of a layer spread on x, each head's token nodes ("L.H@role") just below it; edge width
grows with the edge's count. networkx and matplotlib are imported inside the functions that
need them, so importing this module stays cheap. The HTML page is self-contained: inline SVG
drawn here, no script, no network.
"""

from __future__ import annotations

import html
from pathlib import Path

from catalog.errors import CatalogError

GRAPH_FORMATS = ("graphml", "dot", "html", "png")
SIDE_COLOURS = {"query": "#1f77b4", "key": "#d62728", "reads": "#9a9a9a", "seed": "#2ca02c"}
HEAD_KINDS = ("head", "firing")  # drawn as circles; components (MLP, b_O, embed, offset) as boxes
# Rows of an ACC++ circuit (catalog.trace_accpp), relative to its layers: an MLP or b_O of layer L
# writes after that layer's heads, the embedding and the offsets below everything, the root on top.
_COMPONENT_ROW = {"mlp": 0.5, "attn_bias": 0.5, "embed": None, "offset": None}
TOKEN_DROP = 0.4   # how far below its head (in layers) a head's token nodes sit


def _edge_colour(edge: dict) -> str:
    return SIDE_COLOURS["reads"] if edge["kind"] == "reads" else SIDE_COLOURS.get(edge["side"], "#333333")


def _edge_width(edge: dict, max_count: int) -> float:
    return 0.8 + 4.0 * edge["count"] / max(max_count, 1)


def _component_layout(nodes: list[dict]) -> dict[str, tuple[float, float]]:
    """An ACC++ circuit: y from the node's layer and kind, the nodes of one row spread on x by token."""
    top = max((n["layer"] for n in nodes if n["layer"] is not None), default=0) + 1
    rows: dict[float, list[dict]] = {}
    for node in nodes:
        if node["kind"] == "root":
            y = float(top)
        elif node["kind"] in HEAD_KINDS:
            y = float(node["layer"])
        elif _COMPONENT_ROW.get(node["kind"]) is not None:
            y = node["layer"] + _COMPONENT_ROW[node["kind"]]
        else:
            y = -1.0
        rows.setdefault(y, []).append(node)
    positions = {}
    for y, members in rows.items():
        members.sort(key=lambda n: (n["pos"] or "", n["head"] if n["head"] is not None else -1, n["node"]))
        for i, node in enumerate(members):
            positions[node["node"]] = (i - (len(members) - 1) / 2, y)
    return positions


def layout(graph) -> dict[str, tuple[float, float]]:
    """Node -> (x, y): y = layer (token nodes TOKEN_DROP below their head), heads of a layer on x."""
    nodes = graph.nodes.to_pylist()
    if any(n["kind"] not in ("head", "token") for n in nodes):
        return _component_layout(nodes)
    tokens_of: dict[str, list[str]] = {}
    for node in nodes:
        if node["kind"] == "token":
            tokens_of.setdefault(node["node"].split("@")[0], []).append(node["node"])
    positions = {}
    for layer in sorted({n["layer"] for n in nodes}):
        heads = sorted((n for n in nodes if n["layer"] == layer and n["kind"] == "head"), key=lambda n: n["head"])
        # A head takes as many slots as it has token nodes (at least one), its tokens spread under it.
        widths = [max(1, len(tokens_of.get(h["node"], []))) for h in heads]
        start = -sum(widths) / 2
        for head, width in zip(heads, widths):
            positions[head["node"]] = (start + width / 2, float(layer))
            for i, token in enumerate(sorted(tokens_of.get(head["node"], []))):
                positions[token] = (start + i + 0.5, layer - TOKEN_DROP)
            start += width
    # Token nodes whose head node is missing (not possible from trace(), but keep them drawable).
    for node in nodes:
        positions.setdefault(node["node"], (0.0, node["layer"] - TOKEN_DROP))
    return positions


def _node_label(node: dict, short: bool = True) -> str:
    """A head's name; for a token node its role (or position:token), under its head in our layout.

    Layouts we do not control (DOT) get the full "L.H@role" name instead (short=False).
    """
    if node["kind"] == "root":
        return "output"
    if node["kind"] != "token" or not short:
        return node["node"]
    if node["pos"] is not None:  # one prompt: position and the token's text
        return f"{node['pos']}:{(node['token'] or '').strip()}" + (f" ({node['role']})" if node["role"] else "")
    return node["role"] or node["node"].split("@")[1]


def to_networkx(graph):
    """A networkx MultiDiGraph (two edges may differ only by side); None attributes are left out."""
    import networkx as nx

    g = nx.MultiDiGraph()
    meta = {"run_id": graph.run_id, "prompt_id": graph.prompt_id, "roots": " ".join(graph.roots),
            "dest_role": graph.dest_role, "src_role": graph.src_role}
    g.graph.update({k: v for k, v in meta.items() if v is not None})
    positions = layout(graph)
    for node in graph.nodes.to_pylist():
        attrs = {k: v for k, v in node.items() if k != "node" and v is not None}
        attrs["label"] = _node_label(node)
        attrs["x"], attrs["y"] = positions[node["node"]]
        g.add_node(node["node"], **attrs)
    for edge in graph.edges.to_pylist():
        attrs = {k: v for k, v in edge.items() if k not in ("source", "target") and v is not None}
        attrs["top_svs"] = " ".join(edge["top_svs"] or [])
        g.add_edge(edge["source"], edge["target"], key=f"{edge['kind']}:{edge['side']}", **attrs)
    return g


def to_graphml(graph) -> str:
    import networkx as nx

    return "\n".join(nx.generate_graphml(to_networkx(graph))) + "\n"


def _dot_quote(text: str) -> str:
    return '"' + str(text).replace("\\", "\\\\").replace('"', '\\"') + '"'


def to_dot(graph) -> str:
    """Graphviz DOT, bottom to top, heads of one layer on one rank."""
    nodes, edges = graph.nodes.to_pylist(), graph.edges.to_pylist()
    max_count = max((e["count"] for e in edges), default=1)
    lines = ["digraph circuit {", "  rankdir=BT;", '  node [fontname="Helvetica", fontsize=10];']
    for layer in sorted({n["layer"] for n in nodes if n["layer"] is not None}):
        same = " ".join(_dot_quote(n["node"]) + ";" for n in nodes
                        if n["layer"] == layer and n["kind"] in HEAD_KINDS)
        lines.append(f"  {{ rank=same; {same} }}")
    for node in nodes:
        style = ('shape=circle, style=filled, fillcolor="gold"' if node["is_root"] else
                 "shape=circle" if node["kind"] in HEAD_KINDS else "shape=box, style=rounded")
        lines.append(f"  {_dot_quote(node['node'])} [label={_dot_quote(_node_label(node, short=False))}, {style}];")
    for edge in edges:
        label = "" if edge["kind"] == "reads" else f"{edge['side']} {edge['count']}"
        lines.append(
            f"  {_dot_quote(edge['source'])} -> {_dot_quote(edge['target'])} [label={_dot_quote(label)}, "
            f"color={_dot_quote(_edge_colour(edge))}, penwidth={_edge_width(edge, max_count):.2f}];"
        )
    lines.append("}")
    return "\n".join(lines) + "\n"


def _title(graph) -> str:
    scope = f"prompt {graph.prompt_id}" if graph.prompt_id is not None else "all prompts"
    if any(kind == "root" for kind in graph.nodes.column("kind").to_pylist()):  # ACC++: rooted at the output
        return f"ACC++ circuit of {', '.join(graph.roots)}, run {graph.run_id}, {scope}"
    roles = f"{graph.dest_role or 'any'} -> {graph.src_role or 'any'}"
    return f"Circuit of {', '.join(graph.roots)} ({roles}), run {graph.run_id}, {scope}"


def _svg_radius(node_name: str) -> float:
    return 12.0 if "@" in node_name else 17.0


def _svg(graph, scale_x: float = 90.0, scale_y: float = 110.0, margin: float = 50.0) -> str:
    """An inline SVG drawing (no xmlns URL needed inside HTML5, so the page holds no address at all)."""
    nodes, edges = graph.nodes.to_pylist(), graph.edges.to_pylist()
    if not nodes:
        return "<p>(empty graph: no firing matched the roots)</p>"
    pos = layout(graph)
    xs, ys = [p[0] for p in pos.values()], [p[1] for p in pos.values()]
    width = (max(xs) - min(xs)) * scale_x + 2 * margin
    height = (max(ys) - min(ys)) * scale_y + 2 * margin

    def at(name):
        x, y = pos[name]
        return margin + (x - min(xs)) * scale_x, margin + (max(ys) - y) * scale_y

    max_count = max((e["count"] for e in edges), default=1)
    parts = [f'<svg width="{width:.0f}" height="{height:.0f}" viewBox="0 0 {width:.0f} {height:.0f}" '
             'style="max-width: 100%; height: auto">', "<defs>"]
    for name, colour in SIDE_COLOURS.items():
        parts.append(f'<marker id="arrow-{name}" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="5" '
                     f'markerHeight="5" orient="auto"><path d="M0,0 L10,5 L0,10 z" fill="{colour}"/></marker>')
    parts.append("</defs>")
    for edge in edges:
        (x1, y1), (x2, y2) = at(edge["source"]), at(edge["target"])
        marker = "reads" if edge["kind"] == "reads" else edge["side"]
        tip = (f"{edge['source']} -> {edge['target']}: {edge['kind']} {edge['side']}, count {edge['count']}"
               + (f", mean weight {edge['mean_weight']:.3g}, svs {' '.join(edge['top_svs'])}"
                  if edge["mean_weight"] is not None else ""))
        # Stop short of both nodes (a head is a circle of radius 16, a token a box 18 high).
        length = max(((x2 - x1) ** 2 + (y2 - y1) ** 2) ** 0.5, 1e-6)
        ux, uy = (x2 - x1) / length, (y2 - y1) / length
        start, end = _svg_radius(edge["source"]), _svg_radius(edge["target"]) + 2
        x1, y1, x2, y2 = x1 + ux * start, y1 + uy * start, x2 - ux * end, y2 - uy * end
        parts.append(f'<line x1="{x1:.1f}" y1="{y1:.1f}" x2="{x2:.1f}" y2="{y2:.1f}" '
                     f'stroke="{_edge_colour(edge)}" stroke-opacity="0.7" '
                     f'stroke-width="{_edge_width(edge, max_count):.2f}" marker-end="url(#arrow-{marker})">'
                     f"<title>{html.escape(tip)}</title></line>")
    for node in nodes:
        x, y = at(node["node"])
        label = html.escape(_node_label(node))
        if node["kind"] in HEAD_KINDS or node["is_root"]:
            fill = "gold" if node["is_root"] else "#ffffff"
            parts.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="16" fill="{fill}" stroke="#333"/>')
        else:
            parts.append(f'<rect x="{x - 30:.1f}" y="{y - 9:.1f}" width="60" height="18" rx="6" '
                         f'fill="#f3f3f3" stroke="#888"/>')
        parts.append(f'<text x="{x:.1f}" y="{y + 4:.1f}" text-anchor="middle">{label}'
                     f"<title>{html.escape(node['node'])}</title></text>")
    parts.append("</svg>")
    return "\n".join(parts)


def to_html(graph) -> str:
    """A self-contained page: the drawing as inline SVG, the notes, and the edge list."""
    from catalog.output import render

    notes = "".join(f"<li>{html.escape(n)}</li>" for n in graph.notes)
    legend = " ".join(f'<span style="color:{c}">&#9632; {html.escape(s)}</span>' for s, c in SIDE_COLOURS.items())
    return f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>{html.escape(_title(graph))}</title>
<style>body {{ font-family: sans-serif; margin: 1.5em; }} svg text {{ font-size: 11px; }}
pre {{ font-size: 12px; }}</style></head>
<body><h1 style="font-size:1.2em">{html.escape(_title(graph))}</h1>
<p>{graph.firings.num_rows} firings reached. Edge colour: {legend}; width: count.</p>
{"<ul>" + notes + "</ul>" if notes else ""}
{_svg(graph)}
<h2 style="font-size:1em">Edges</h2>
<pre>{html.escape(render(graph.edges, "table"))}</pre>
</body></html>
"""


def to_png(graph, path: str | Path) -> Path:
    """Draw the graph with matplotlib (Agg backend, no display needed) into a PNG file."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    nodes, edges = graph.nodes.to_pylist(), graph.edges.to_pylist()
    pos = layout(graph) if nodes else {}
    xs = [p[0] for p in pos.values()] or [0.0]
    ys = [p[1] for p in pos.values()] or [0.0]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * (max(xs) - min(xs)) + 2), max(4.0, 1.6 * (max(ys) - min(ys)) + 2)))
    max_count = max((e["count"] for e in edges), default=1)
    for edge in edges:
        ax.annotate("", xy=pos[edge["target"]], xytext=pos[edge["source"]],
                    arrowprops=dict(arrowstyle="-|>", color=_edge_colour(edge), alpha=0.6,
                                    lw=_edge_width(edge, max_count), shrinkA=12, shrinkB=12,
                                    connectionstyle="arc3,rad=0.06"))  # bent a little: long edges stay apart
    for node in nodes:
        x, y = pos[node["node"]]
        if node["kind"] in HEAD_KINDS or node["is_root"]:
            face = "gold" if node["is_root"] else "white"
            ax.text(x, y, _node_label(node), ha="center", va="center", fontsize=9, zorder=3,
                    bbox=dict(boxstyle="circle,pad=0.3", fc=face, ec="#333333"))
        else:
            ax.text(x, y, _node_label(node), ha="center", va="center", fontsize=7, zorder=3,
                    bbox=dict(boxstyle="round,pad=0.25", fc="#f3f3f3", ec="#888888"))
    if not nodes:
        ax.text(0, 0, "empty graph: no firing matched the roots", ha="center", va="center")
    ax.set_xlim(min(xs) - 1, max(xs) + 1)
    ax.set_ylim(min(ys) - 0.6, max(ys) + 0.6)
    ax.set_yticks(sorted({n["layer"] for n in nodes if n["layer"] is not None}))
    ax.set_ylabel("layer")
    ax.set_xticks([])
    for spine in ("top", "right", "bottom"):
        ax.spines[spine].set_visible(False)
    ax.legend(handles=[Line2D([0], [0], color=c, lw=2, label=s) for s, c in SIDE_COLOURS.items()],
              loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8, frameon=False)
    ax.set_title(_title(graph), fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, format="png", dpi=120)
    plt.close(fig)
    return path


def render_graph(graph, fmt: str, out: str | Path | None = None) -> str | None:
    """The graph as text in `fmt` (graphml, dot, html), or a PNG file at `out` (required for png)."""
    if fmt == "png":
        if out is None:
            raise CatalogError("--format png needs --out FILE.png")
        to_png(graph, out)
        return None
    writers = {"graphml": to_graphml, "dot": to_dot, "html": to_html}
    if fmt not in writers:
        raise CatalogError(f"unknown graph format '{fmt}' (choose from {', '.join(GRAPH_FORMATS)})")
    return writers[fmt](graph)
