"""Pictures and exports of a traced circuit (catalog.read.trace.TraceGraph): GraphML, DOT, HTML, PNG.

The HTML (inline SVG) and the PNG (matplotlib) draw one and the same scene, computed here
(`scene`): every node's place, shape and label, every edge's path, the layer axis. So what one
shows, the other shows.

- Rows are the layers that have nodes, and only those (no gaps for empty layers); the layer
  axis on the left names them. Information flows up: layer 0 at the bottom. A 2024-method
  trace puts each head's token nodes just below it, labelled with their head and their role
  (or position and token for one prompt). An ACC++ circuit puts MLP and b_O leaves of layer L
  between layers L and L+1, the embedding and offsets at the bottom, the output on top.
- An edge passes every row it crosses through a gap between that row's nodes (a smooth curve
  through those gaps, or straight segments where the curve would touch a node), so a long edge
  never reads as a chain
  through unrelated nodes. Edges between the same two nodes (a query and a key edge) are drawn
  side by side along one route and never overlap.
- Colour and dash say the side (query: blue, solid; key: red, dashed; a token node to its head:
  grey, dotted; ACC++ seeds: green); width grows with |mean weight| x edges.

networkx and matplotlib are imported inside the functions that need them, so importing this
module stays cheap. The HTML page is self-contained: inline SVG, no script, no network.
"""

from __future__ import annotations

import html
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from catalog import formats
from catalog.errors import CatalogError
from catalog.formats import GRAPH_FORMATS
from catalog.formats.table import direction_name
SIDE_COLOURS = {"query": "#1f77b4", "key": "#d62728", "reads": "#9a9a9a", "seed": "#2ca02c"}
SIDE_DASHES = {"query": None, "key": (6, 3), "reads": (2, 3), "seed": None}
LEGEND = {"query": "query side", "key": "key side", "reads": "token node -> its head", "seed": "seed -> output"}
HEAD_KINDS = ("head", "firing")  # heads are circles; firings, token nodes and components boxes
TOP_SVS_FORMAT = ("JSON list of {\"sv\": int, \"share\": float}, largest first: sv = a singular direction of the "
                  "downstream head's QK matrix; share = that direction's part of the edge weight (its term divided "
                  "by the whole weight), signed, and above 1 when other directions' terms are negative")
# Added to it for a rotary model's graph (GPT-2's files stay as they were).
TOP_SVS_OFFSET_FORMAT = ("; each item also has \"pos_offset\": the direction is sv of the form at that offset "
                         "(the same sv at two offsets is two directions)")

ROW_HEIGHT = 170.0     # pixels between two layer rows
TOKEN_DROP = 56.0      # a token node sits this far below its head
FONT_PX = 11.0         # label size
CHAR_PX = 6.8          # approximate width of one character at FONT_PX (DejaVu Sans, as matplotlib draws)
MARGIN_LEFT, MARGIN = 90.0, 30.0
GAP = 32.0             # between two nodes of a row


@dataclass
class Shape:
    name: str
    x: float
    y: float
    w: float               # box width (circle: diameter)
    h: float               # box height (circle: diameter)
    circle: bool
    lines: list[str]
    fill: str = "#ffffff"
    stroke: str = "#333333"
    tip: str = ""

    def contains(self, px: float, py: float, pad: float = 0.0) -> bool:
        if self.circle:
            return (px - self.x) ** 2 + (py - self.y) ** 2 <= (self.w / 2 + pad) ** 2
        return abs(px - self.x) <= self.w / 2 + pad and abs(py - self.y) <= self.h / 2 + pad


@dataclass
class EdgePath:
    edge: dict
    points: list[tuple[float, float]]   # the drawn polyline, trimmed at both nodes
    colour: str
    width: float
    dash: tuple | None
    side: str                            # query | key | reads | seed


@dataclass
class Scene:
    title: str
    width: float
    height: float
    nodes: list[Shape] = field(default_factory=list)
    edges: list[EdgePath] = field(default_factory=list)
    axis: list[tuple[float, str]] = field(default_factory=list)   # (y, label) of each row
    legend: list[str] = field(default_factory=list)
    empty: str | None = None


def _edge_side(edge: dict) -> str:
    return "reads" if edge["kind"] == "reads" else edge["side"] if edge["side"] in SIDE_COLOURS else "query"


def _edge_colour(edge: dict) -> str:
    return SIDE_COLOURS.get(_edge_side(edge), "#333333")


def _strength(edge: dict) -> float:
    return abs(edge.get("mean_weight") or 0.0) * (edge.get("n_edges") or 1)


def _svs_text(svs) -> str:
    return " ".join(f"{direction_name(s)}:{s['share']:.2f}" for s in svs or [] if s.get("share") is not None)


def _head_blocks(nodes: list[dict]) -> bool:
    """Whether the graph is of heads and their token nodes (a trace rooted at heads) rather than of
    firings and components rooted at the output. Read from the nodes, not from the run's method:
    a drawing is of whatever TraceGraph it is given, built from a run or not."""
    return all(n["kind"] in ("head", "token") for n in nodes)


def _node_lines(node: dict) -> list[str]:
    """What a node's box says: its head and role (token nodes), its firing or component and token."""
    name = node["node"]
    if node["kind"] == "root":
        return ["output", (node.get("token") or "")[:48]] if node.get("token") else ["output"]
    if node["kind"] == "head":
        return [name]
    if node["kind"] == "token":
        head = name.split("@")[0]
        if node.get("token") is not None:  # one prompt: position, token, role
            text = f"{node['pos']}:{node['token'].strip()[:10]}"
            return [head, text + (f" ({node['role']})" if node.get("role") else "")]
        return [head, node["role"] or name.split("@")[1]]
    component, _, where = name.partition("@")
    return [component, where]


def _shape_of(node: dict) -> Shape:
    lines = _node_lines(node)
    text_w = max(len(line) for line in lines) * CHAR_PX
    if node["kind"] == "head":
        d = max(36.0, text_w + 8)
        fill = "gold" if node.get("is_root") else "#ffffff"
        return Shape(node["node"], 0, 0, d, d, True, lines, fill)
    fill = {"root": "gold", "token": "#f3f3f3", "firing": "#ffffff"}.get(node["kind"], "#e8f0e0")
    stroke = "#333333" if node["kind"] in ("root", "firing") else "#888888"
    return Shape(node["node"], 0, 0, text_w + 12, 14 + 12 * len(lines), False, lines, fill, stroke)


def _rows(nodes: list[dict]) -> tuple[dict[str, float], dict[float, str]]:
    """Each node's row key (sortable, larger = higher) and each row key's axis label."""
    layers = [n["layer"] for n in nodes if n["layer"] is not None]
    top = (max(layers) if layers else 0) + 1
    key, labels = {}, {}
    for n in nodes:
        if n["kind"] == "root":
            k, label = float(top), "output"
        elif n["kind"] in ("head", "token", "firing"):
            k, label = float(n["layer"]), f"layer {n['layer']}"
        elif n["kind"] in ("mlp", "attn_bias"):
            k, label = n["layer"] + 0.5, f"MLP, b_O {n['layer']}"
        else:
            k, label = -1.0, "embed, offset"
        key[n["node"]] = k
        labels[k] = label
    return key, labels


def _barycentre(name: str, edges: list[dict], shapes: dict[str, Shape], y: float, index: int) -> tuple:
    """Sort key of a node in its row: the mean x of the nodes above it that it writes to (already
    placed), so that edges run as upright as they can; nodes that write to none keep their order."""
    xs = [shapes[e["target"]].x for e in edges
          if e["source"] == name and e["target"] in shapes and shapes[e["target"]].y < y - 1 and shapes[e["target"]].x]
    return (0, sum(xs) / len(xs), index) if xs else (0, MARGIN_LEFT + index * 60.0, index)


def _place(nodes: list[dict], edges: list[dict]) -> tuple[dict[str, Shape], list[tuple[float, str]], float, float]:
    """Node shapes at their places; the axis; the scene's width and height."""
    shapes = {n["node"]: _shape_of(n) for n in nodes}
    row_of, labels = _rows(nodes)
    order = sorted(set(row_of.values()), reverse=True)   # top row first
    y_of = {k: MARGIN + 40 + i * ROW_HEIGHT for i, k in enumerate(order)}
    by_name = {n["node"]: n for n in nodes}
    widths = {}
    rows_members: dict[float, list] = {}
    if _head_blocks(nodes):
        # 2024 method: a head and its token nodes form one block; blocks of a layer side by side.
        tokens_of: dict[str, list[str]] = {}
        for n in nodes:
            if n["kind"] == "token":
                tokens_of.setdefault(n["node"].split("@")[0], []).append(n["node"])
        for n in nodes:
            if n["kind"] != "head":
                continue
            toks = sorted(tokens_of.get(n["node"], []), key=lambda t: (by_name[t]["pos"] is None, by_name[t]["pos"] or 0,
                                                                       by_name[t]["role"] or ""))
            block_w = max(shapes[n["node"]].w, sum(shapes[t].w for t in toks) + GAP * max(len(toks) - 1, 0))
            rows_members.setdefault(row_of[n["node"]], []).append((n, toks, block_w))
        for k, members in rows_members.items():
            members.sort(key=lambda m: m[0]["head"])
            widths[k] = sum(m[2] for m in members) + 2 * GAP * (len(members) - 1)
        full = max(widths.values(), default=0.0)
        for k in order:  # top row first: each row ordered under what it writes to (fewer crossings)
            members = rows_members.get(k, [])
            if k != order[0]:
                keys = [_barycentre(m[0]["node"], edges, shapes, y_of[k], i) for i, m in enumerate(members)]
                members[:] = [m for _, m in sorted(zip(keys, members), key=lambda km: km[0])]
            x = MARGIN_LEFT + (full - widths[k]) / 2
            for head, toks, block_w in members:
                s = shapes[head["node"]]
                s.x, s.y = x + block_w / 2, y_of[k]
                tok_w = sum(shapes[t].w for t in toks) + GAP * max(len(toks) - 1, 0)
                tx = x + (block_w - tok_w) / 2
                for t in toks:
                    shapes[t].x, shapes[t].y = tx + shapes[t].w / 2, y_of[k] + TOKEN_DROP
                    tx += shapes[t].w + GAP
                x += block_w + 2 * GAP
        for n in nodes:  # a token node whose head is missing (not possible from trace())
            if n["kind"] == "token" and shapes[n["node"]].x == 0:
                shapes[n["node"]].x, shapes[n["node"]].y = MARGIN_LEFT, y_of[row_of[n["node"]]] + TOKEN_DROP
        height = MARGIN + 40 + (len(order) - 1) * ROW_HEIGHT + TOKEN_DROP + 40 + MARGIN
    else:
        # ACC++: a row per layer (firings), per MLP/b_O level, the output and the leaves; by token, then head.
        def token_key(n):
            where = n["node"].partition("@")[2]
            first = where.split(">")[0]
            return (0, int(first), "") if first.isdigit() else (1, 0, first)

        for n in nodes:
            rows_members.setdefault(row_of[n["node"]], []).append(n)
        for k, members in rows_members.items():
            members.sort(key=lambda n: (token_key(n), n["head"] if n["head"] is not None else -1, n["node"]))
            widths[k] = sum(shapes[n["node"]].w for n in members) + GAP * (len(members) - 1)
        full = max(widths.values(), default=0.0)
        for k in order:
            members = rows_members.get(k, [])
            if k != order[0]:
                keys = [_barycentre(n["node"], edges, shapes, y_of[k], i) for i, n in enumerate(members)]
                members[:] = [n for _, n in sorted(zip(keys, members), key=lambda kn: kn[0])]
            x = MARGIN_LEFT + (full - widths[k]) / 2
            for n in members:
                s = shapes[n["node"]]
                s.x, s.y = x + s.w / 2, y_of[k]
                x += s.w + GAP
        height = MARGIN + 40 + (len(order) - 1) * ROW_HEIGHT + 40 + MARGIN
    width = MARGIN_LEFT + max(widths.values(), default=0.0) + MARGIN + 200   # room for the legend
    axis = [(y_of[k], labels[k]) for k in order]
    return shapes, axis, width, height


PASS_PAD = 9.0   # clearance an edge keeps from a node it passes


def _levels(shapes: list[Shape]) -> dict[float, list[tuple[float, float, float]]]:
    """Each distinct node height y -> the blocked x intervals there (with clearance) and half height."""
    levels: dict[float, list[tuple[float, float, float]]] = {}
    for s in shapes:
        levels.setdefault(round(s.y, 1), []).append((s.x - s.w / 2 - PASS_PAD, s.x + s.w / 2 + PASS_PAD, s.h / 2))
    return levels


def _gap_x(ideal: float, blocked: list[tuple[float, float, float]], lo: float, hi: float,
           offset: float = 0.0) -> float:
    """The x nearest to `ideal` that passes between the blocked intervals of one level (a parallel
    edge, `offset` sideways, keeps its side of the gap)."""
    spans = sorted((a, b) for a, b, _ in blocked)
    merged: list[list[float]] = []
    for a, b in spans:
        if merged and a <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    free, cursor = [], lo
    for a, b in merged:
        if a > cursor:
            free.append((cursor, a))
        cursor = max(cursor, b)
    if cursor < hi:
        free.append((cursor, hi))
    if not free:
        return ideal
    best = min(free, key=lambda f: 0.0 if f[0] <= ideal <= f[1] else min(abs(ideal - f[0]), abs(ideal - f[1])))
    middle = (best[0] + best[1]) / 2
    if best[1] - best[0] < 4 * PASS_PAD + 2 * abs(offset):   # a narrow gap between two nodes: its middle
        return middle + max(min(offset / 2, (best[1] - best[0]) / 2 + PASS_PAD - 2), -((best[1] - best[0]) / 2 + PASS_PAD - 2))
    return min(max(ideal, best[0] + 2 + max(offset, 0)), best[1] - 2 + min(offset, 0))


def _spline(points: list[tuple[float, float]], per_segment: int = 10) -> list[tuple[float, float]]:
    """A Catmull-Rom curve through the points (a smooth line that passes every waypoint)."""
    if len(points) < 3:
        return [(points[0][0] + (points[-1][0] - points[0][0]) * i / 20,
                 points[0][1] + (points[-1][1] - points[0][1]) * i / 20) for i in range(21)]
    ext = [points[0]] + points + [points[-1]]
    out = []
    for i in range(1, len(ext) - 2):
        p0, p1, p2, p3 = ext[i - 1], ext[i], ext[i + 1], ext[i + 2]
        for k in range(per_segment):
            t = k / per_segment
            t2, t3 = t * t, t * t * t
            out.append(tuple(0.5 * (2 * p1[j] + (-p0[j] + p2[j]) * t + (2 * p0[j] - 5 * p1[j] + 4 * p2[j] - p3[j]) * t2
                                    + (-p0[j] + 3 * p1[j] - 3 * p2[j] + p3[j]) * t3) for j in (0, 1)))
    out.append(points[-1])
    return out


def _route(src: Shape, dst: Shape, levels, bounds: tuple[float, float], offset: float,
           others: list[Shape], direct: bool = False) -> list[tuple[float, float]]:
    """A smooth line from src to dst that passes between the nodes of every level it crosses
    (never through one), shifted sideways by `offset` pixels (parallel edges), trimmed at both ends."""
    (x0, y0), (x1, y1) = (src.x, src.y), (dst.x, dst.y)
    lo_y, hi_y = min(y0, y1), max(y0, y1)
    up = 1.0 if y0 > y1 else -1.0   # drawn upwards (y shrinks) or downwards
    way = [(x0, y0)]
    if abs(y1 - y0) > src.h / 2 + dst.h / 2 + 24:   # leave and enter vertically, clear of the neighbours
        way.append((x0 + offset, y0 - up * (src.h / 2 + 8)))
    crossed = sorted((y for y in levels if lo_y + 1 < y < hi_y - 1), reverse=y0 > y1)
    for y in crossed:
        ideal = x0 + (x1 - x0) * (y - y0) / (y1 - y0) + offset
        half = max(h for _, _, h in levels[y]) + 3
        gx = _gap_x(ideal, levels[y], *bounds, offset=offset)
        before, after = (y + half, y - half) if y0 > y1 else (y - half, y + half)
        way += [(gx, before), (gx, after)]
    if len(way) > 1:
        way.append((x1 + offset, y1 + up * (dst.h / 2 + 8)))
    if len(way) == 1 and offset:   # no level between: bow the line sideways
        length = math.hypot(x1 - x0, y1 - y0) or 1.0
        way.append(((x0 + x1) / 2 - offset * (y1 - y0) / length * 2, (y0 + y1) / 2 + offset * (x1 - x0) / length * 2))
    way.append((x1, y1))
    # Candidates, smoothest first: a curve through the waypoints; the same with a vertical exit and
    # entry (short edges between neighbours); straight segments through the waypoints (between two
    # levels there is no node, and each level is passed vertically in a gap, so these pass none).
    vertical = way[:1] + [(x0 + offset, y0 - up * (src.h / 2 + 7))] * (len(way) == 2 or len(way) == 3 and offset != 0) \
        + way[1:-1] + [(x1 + offset, y1 + up * (dst.h / 2 + 7))] * (len(way) == 2 or len(way) == 3 and offset != 0) \
        + way[-1:]
    candidates = [_spline(way), _spline(vertical) if vertical != way else None, _straight(way), _straight(vertical)]
    if direct:   # a token node to its own head, just above it: straight out of its top
        candidates = [_straight([(x0, y0), (x0, y0 - up * (src.h / 2 + 2)), (x1, y1)])] + candidates
    straight_length = _length(_straight(way))
    candidates = [c for c in candidates[:2] if c is not None and _length(c) < 1.25 * straight_length + 20] \
        + candidates[2:]   # a curve that loops back is no smoother than straight segments
    best, best_hits = None, None
    for pts in candidates:
        if pts is None:
            continue
        pts = _trim(pts, src, dst)
        n = _hits(pts, others, src, dst)
        if best_hits is None or n < best_hits:
            best, best_hits = pts, n
        if n == 0:
            break
    return best


PARALLEL_PX = 9.0   # between two edges drawn along the same route


def _parallel(pts: list[tuple[float, float]], shift: float) -> list[tuple[float, float]]:
    """The polyline moved `shift` pixels sideways (to its left for shift > 0), point by point."""
    out = []
    for i, (x, y) in enumerate(pts):
        (ax, ay), (bx, by) = pts[max(i - 1, 0)], pts[min(i + 1, len(pts) - 1)]
        length = math.hypot(bx - ax, by - ay) or 1.0
        out.append((x - shift * (by - ay) / length, y + shift * (bx - ax) / length))
    return out


def _length(pts) -> float:
    return sum(math.hypot(bx - ax, by - ay) for (ax, ay), (bx, by) in zip(pts, pts[1:]))


def _straight(way: list[tuple[float, float]], per_segment: int = 12) -> list[tuple[float, float]]:
    out = []
    for (ax, ay), (bx, by) in zip(way, way[1:]):
        out += [(ax + (bx - ax) * k / per_segment, ay + (by - ay) * k / per_segment) for k in range(per_segment)]
    return out + [way[-1]]


def _trim(pts, src: Shape, dst: Shape):
    start = next((i for i, p in enumerate(pts) if not src.contains(*p, pad=2)), 0)
    end = next((i for i in range(len(pts) - 1, -1, -1) if not dst.contains(*pts[i], pad=4)), len(pts) - 1)
    return pts[start:end + 1] if end > start else [pts[0], pts[-1]]


def _hits(pts, others: list[Shape], src: Shape, dst: Shape) -> int:
    """How many nodes other than its ends a drawn edge passes through."""
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    x_lo, x_hi, y_lo, y_hi = min(xs), max(xs), min(ys), max(ys)
    return sum(1 for s in others if s is not src and s is not dst
               and s.x + s.w / 2 + 2 >= x_lo and s.x - s.w / 2 - 2 <= x_hi and s.y + s.h / 2 + 2 >= y_lo
               and s.y - s.h / 2 - 2 <= y_hi and any(s.contains(x, y, pad=2) for x, y in pts))


def scene(graph) -> Scene:
    """Everything both drawings show, in pixels (y grows downwards)."""
    nodes, edges = graph.nodes.to_pylist(), graph.edges.to_pylist()
    result = Scene(_title(graph), 640.0, 200.0)
    if not nodes:
        result.empty = "empty graph: nothing matched (see the notes)"
        return result
    shapes, axis, width, height = _place(nodes, edges)
    result.width, result.height, result.axis = max(width, 640.0), height, axis
    all_shapes = list(shapes.values())
    levels = _levels(all_shapes)
    bounds = (MARGIN_LEFT - 6, width - 200)
    for name, node in ((n["node"], n) for n in nodes):
        s = shapes[name]
        s.tip = name + (f" ({node['kind']})" if node["kind"] != "head" else "") + (
            f", in {node['count']} prompts" if node.get("count") else "")
    max_strength = max((_strength(e) for e in edges if e["kind"] != "reads"), default=1.0) or 1.0
    pairs: dict[frozenset, list[dict]] = {}
    for e in edges:
        pairs.setdefault(frozenset((e["source"], e["target"])), []).append(e)
    for group in pairs.values():
        group.sort(key=lambda e: (e["side"] or "", e["kind"]))
        e = group[0]
        if e["source"] not in shapes or e["target"] not in shapes:
            continue
        # One route for the two nodes; edges that share it (a query and a key edge) are drawn as
        # parallel copies on either side of it, so they can never overlap or cross.
        base = _route(shapes[e["source"]], shapes[e["target"]], levels, bounds, 0.0, all_shapes,
                      direct=e["kind"] == "reads")
        src, dst = shapes[e["source"]], shapes[e["target"]]
        copies = [base]
        if len(group) > 1:   # closer together where the route passes near a node, if it must
            for spacing in (PARALLEL_PX, PARALLEL_PX * 0.6, PARALLEL_PX * 0.4):
                copies = [_parallel(base, (i - (len(group) - 1) / 2) * spacing) for i in range(len(group))]
                if not any(_hits(c, all_shapes, src, dst) for c in copies):
                    break
            else:   # no room beside this route: each edge its own route, bent to its own side
                copies = [_route(src, dst, levels, bounds, (i - (len(group) - 1) / 2) * 24.0, all_shapes)
                          for i in range(len(group))]
        for e, points in zip(group, copies):
            side = _edge_side(e)
            width_px = 1.2 if e["kind"] == "reads" else 0.9 + 4.5 * _strength(e) / max_strength
            result.edges.append(EdgePath(e, points, _edge_colour(e), width_px, SIDE_DASHES.get(side), side))
    result.nodes = [shapes[n["node"]] for n in nodes]
    sides = {p.side for p in result.edges}
    result.legend = [s for s in SIDE_COLOURS if s in sides]
    return result


def _edge_tip(e: dict) -> str:
    tip = f"{e['source']} -> {e['target']}: {e['kind']} {e['side']}, count {e['count']}"
    if e.get("mean_weight") is not None:
        tip += f", mean weight {e['mean_weight']:.3g}"
        if e.get("top_svs"):
            tip += f", singular directions (sv:share) {_svs_text(e['top_svs'])}"
    return tip


def _arrow_head(points, size: float = 8.0) -> list[tuple[float, float]]:
    (x1, y1), (x2, y2) = points[-2] if len(points) > 1 else points[0], points[-1]
    length = math.hypot(x2 - x1, y2 - y1) or 1.0
    ux, uy = (x2 - x1) / length, (y2 - y1) / length
    bx, by = x2 - ux * size, y2 - uy * size
    return [(x2, y2), (bx - uy * size * 0.45, by + ux * size * 0.45), (bx + uy * size * 0.45, by - ux * size * 0.45)]


# -- GraphML and DOT ---------------------------------------------------------------------------

def to_networkx(graph):
    """A networkx MultiDiGraph (two edges may differ only by side); None attributes are left out.

    Edge attribute top_svs is JSON text (GraphML has no lists); the graph attribute
    top_svs_format says how to read it. Nodes carry x, y: their place in the drawings."""
    import networkx as nx

    g = nx.MultiDiGraph()
    nodes, edges = graph.nodes.to_pylist(), graph.edges.to_pylist()
    per_offset = any(s.get("pos_offset") is not None for e in edges for s in e.get("top_svs") or [])
    meta = {"run_id": graph.run_id, "prompt_id": graph.prompt_id, "roots": " ".join(graph.roots),
            "dest_role": graph.dest_role, "src_role": graph.src_role,
            "top_svs_format": TOP_SVS_FORMAT + (TOP_SVS_OFFSET_FORMAT if per_offset else ""),
            "notes": "\n".join(graph.notes)}
    g.graph.update({k: v for k, v in meta.items() if v is not None and v != ""})
    placed = _place(nodes, edges)[0] if nodes else {}   # the drawings' places, without routing the edges
    for node in graph.nodes.to_pylist():
        attrs = {k: v for k, v in node.items() if k != "node" and v is not None}
        attrs["label"] = " ".join(line for line in _node_lines(node) if line)
        if node["node"] in placed:
            attrs["x"], attrs["y"] = placed[node["node"]].x, -placed[node["node"]].y
        g.add_node(node["node"], **attrs)
    for edge in graph.edges.to_pylist():
        attrs = {k: v for k, v in edge.items() if k not in ("source", "target", "top_svs") and v is not None}
        attrs["top_svs"] = json.dumps([{**({"pos_offset": s["pos_offset"]} if s.get("pos_offset") is not None else {}),
                                        "sv": s["sv"], "share": _short(s["share"])} for s in edge["top_svs"] or []])
        g.add_edge(edge["source"], edge["target"], key=f"{edge['kind']}:{edge['side']}", **attrs)
    return g


def _short(value):
    from catalog.formats.table import float32_text

    return None if value is None else float(float32_text(value))


def to_graphml(graph) -> str:
    import networkx as nx

    return "\n".join(nx.generate_graphml(to_networkx(graph))) + "\n"


def _dot_quote(text: str) -> str:
    return '"' + str(text).replace("\\", "\\\\").replace('"', '\\"') + '"'


def to_dot(graph) -> str:
    """Graphviz DOT, bottom to top, heads of one layer on one rank."""
    nodes, edges = graph.nodes.to_pylist(), graph.edges.to_pylist()
    max_strength = max((_strength(e) for e in edges if e["kind"] != "reads"), default=1.0) or 1.0
    lines = ["digraph circuit {", "  rankdir=BT;", '  node [fontname="Helvetica", fontsize=10];']
    for layer in sorted({n["layer"] for n in nodes if n["layer"] is not None}):
        same = " ".join(_dot_quote(n["node"]) + ";" for n in nodes
                        if n["layer"] == layer and n["kind"] in HEAD_KINDS)
        lines.append(f"  {{ rank=same; {same} }}")
    for node in nodes:
        style = ('shape=circle, style=filled, fillcolor="gold"' if node["is_root"] else
                 "shape=circle" if node["kind"] == "head" else "shape=box, style=rounded")
        label = "\\n".join(_dot_quote(line)[1:-1] for line in _node_lines(node) if line)
        lines.append(f"  {_dot_quote(node['node'])} [label=\"{label}\", {style}];")
    for edge in edges:
        label = "" if edge["kind"] == "reads" else f"{edge['side']} {edge['count']}"
        width = 1.2 if edge["kind"] == "reads" else 0.9 + 4.5 * _strength(edge) / max_strength
        style = {"key": ", style=dashed", "reads": ", style=dotted"}.get(_edge_side(edge), "")
        lines.append(
            f"  {_dot_quote(edge['source'])} -> {_dot_quote(edge['target'])} [label={_dot_quote(label)}, "
            f"color={_dot_quote(_edge_colour(edge))}, penwidth={width:.2f}{style}];"
        )
    lines.append("}")
    return "\n".join(lines) + "\n"


def _title(graph) -> str:
    scope = f"prompt {graph.prompt_id}" if graph.prompt_id is not None else "all prompts"
    if any(kind == "root" for kind in graph.nodes.column("kind").to_pylist()):  # ACC++: rooted at the output
        return f"ACC++ circuit of {', '.join(graph.roots)}, run {graph.run_id}, {scope}"
    roles = f"{graph.dest_role or 'any'} -> {graph.src_role or 'any'}"
    return f"Circuit of {', '.join(graph.roots)} ({roles}), run {graph.run_id}, {scope}"


# -- SVG (HTML) ----------------------------------------------------------------------------------

def _svg(graph) -> str:
    """The scene as inline SVG (no xmlns URL needed inside HTML5, so the page holds no address at all)."""
    sc = scene(graph)
    if sc.empty:
        return f"<p>({html.escape(sc.empty)})</p>"
    parts = [f'<svg class="circuit" width="{sc.width:.0f}" height="{sc.height:.0f}" '
             f'viewBox="0 0 {sc.width:.0f} {sc.height:.0f}" style="max-width: 100%; height: auto">']
    for y, label in sc.axis:   # the layer axis
        parts.append(f'<line class="lane" x1="{MARGIN_LEFT - 10:.0f}" x2="{sc.width - 200:.0f}" y1="{y:.1f}" '
                     f'y2="{y:.1f}" stroke="#eeeeee"/>')
        parts.append(f'<text class="axis" x="8" y="{y + 4:.1f}" font-size="{FONT_PX + 1:.0f}" fill="#555">'
                     f"{html.escape(label)}</text>")
    parts.append(f'<line x1="{MARGIN_LEFT - 14:.0f}" x2="{MARGIN_LEFT - 14:.0f}" y1="{MARGIN:.0f}" '
                 f'y2="{sc.height - MARGIN:.0f}" stroke="#999"/>')
    for p in sc.edges:
        d = "M" + " L".join(f"{x:.1f},{y:.1f}" for x, y in p.points)
        dash = f' stroke-dasharray="{p.dash[0]},{p.dash[1]}"' if p.dash else ""
        head = " ".join(f"{x:.1f},{y:.1f}" for x, y in _arrow_head(p.points, 6 + p.width))
        parts.append(f'<g class="edge" data-source="{html.escape(p.edge["source"])}" '
                     f'data-target="{html.escape(p.edge["target"])}" data-side="{html.escape(str(p.edge["side"]))}">'
                     f'<title>{html.escape(_edge_tip(p.edge))}</title>'
                     f'<path d="{d}" fill="none" stroke="{p.colour}" stroke-opacity="0.75" '
                     f'stroke-width="{p.width:.2f}"{dash}/>'
                     f'<polygon points="{head}" fill="{p.colour}"/></g>')
    for s in sc.nodes:
        parts.append(f'<g class="node" data-node="{html.escape(s.name)}"><title>{html.escape(s.tip)}</title>')
        if s.circle:
            parts.append(f'<circle cx="{s.x:.1f}" cy="{s.y:.1f}" r="{s.w / 2:.1f}" fill="{s.fill}" stroke="{s.stroke}"/>')
        else:
            parts.append(f'<rect x="{s.x - s.w / 2:.1f}" y="{s.y - s.h / 2:.1f}" width="{s.w:.1f}" height="{s.h:.1f}" '
                         f'rx="5" fill="{s.fill}" stroke="{s.stroke}"/>')
        top = s.y - (len(s.lines) - 1) * 6
        for i, line in enumerate(s.lines):
            parts.append(f'<text x="{s.x:.1f}" y="{top + i * 12 + 3.5:.1f}" text-anchor="middle" '
                         f'font-size="{FONT_PX:.0f}">{html.escape(line)}</text>')
        parts.append("</g>")
    x0 = sc.width - 190
    for i, side in enumerate(sc.legend):
        y = MARGIN + 10 + i * 16
        dash = f' stroke-dasharray="{SIDE_DASHES[side][0]},{SIDE_DASHES[side][1]}"' if SIDE_DASHES[side] else ""
        parts.append(f'<line x1="{x0:.0f}" x2="{x0 + 24:.0f}" y1="{y}" y2="{y}" stroke="{SIDE_COLOURS[side]}" '
                     f'stroke-width="2"{dash}/><text x="{x0 + 30:.0f}" y="{y + 4}" font-size="{FONT_PX:.0f}">'
                     f"{html.escape(LEGEND[side])}</text>")
    parts.append("</svg>")
    return "\n".join(parts)


LARGE = 150   # edges above which a drawing suggests pruning


def drawing_notes(graph) -> list[str]:
    """What a reader of a large drawing should know."""
    n = sum(1 for k in graph.edges.column("kind").to_pylist() if k != "reads") if graph.edges.num_rows else 0
    if n > LARGE and not any(note.startswith(("pruned", "picture pruned")) for note in graph.notes):
        return [f"{n} edges are hard to read in one picture: prune with --top-k 3, --min-count N, --min-weight W "
                "or --max-depth D"]
    return []


def to_html(graph) -> str:
    """A self-contained page: the drawing as inline SVG, the notes, and the edge list."""
    from catalog.formats.table import render

    notes = "".join(f"<li>{html.escape(n)}</li>" for n in graph.notes + drawing_notes(graph))
    return f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>{html.escape(_title(graph))}</title>
<style>body {{ font-family: sans-serif; margin: 1.5em; }} svg text {{ font-family: sans-serif; }}
pre {{ font-size: 12px; }}</style></head>
<body><h1 style="font-size:1.2em">{html.escape(_title(graph))}</h1>
<p>{html.escape(graph.summary() if hasattr(graph, "summary") else "")}. Edge colour and dash: the side; width:
|mean weight| x edges; hover an edge or node for details.</p>
{"<ul>" + notes + "</ul>" if notes else ""}
{_svg(graph)}
<h2 style="font-size:1em">Edges</h2>
<pre>{html.escape(render(graph.edges, "table"))}</pre>
</body></html>
"""


# -- PNG ---------------------------------------------------------------------------------------

def to_png(graph, path: str | Path) -> Path:
    """Draw the scene with matplotlib (Agg backend, no display needed) into a PNG file."""
    path = Path(path)
    _draw_png(graph, path)
    return path


def png_bytes(graph) -> bytes:
    """The PNG file's bytes (to_png), for a download."""
    import io

    buffer = io.BytesIO()
    _draw_png(graph, buffer)
    return buffer.getvalue()


def _draw_png(graph, target) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Circle, FancyBboxPatch, Polygon

    sc = scene(graph)
    dpi = 100.0
    pt = 72.0 / dpi   # points per pixel
    fig = plt.figure(figsize=(sc.width / dpi, (sc.height + 30) / dpi), dpi=dpi)
    ax = fig.add_axes([0, 0, 1, sc.height / (sc.height + 30)])
    ax.set_xlim(0, sc.width)
    ax.set_ylim(sc.height, 0)
    ax.axis("off")
    fig.text(0.5, 1 - 15 / (sc.height + 30), sc.title, ha="center", va="center", fontsize=(FONT_PX + 2) * pt * 1.0)
    if sc.empty:
        ax.text(sc.width / 2, sc.height / 2, sc.empty, ha="center", va="center", fontsize=FONT_PX * pt * 1.2)
    for y, label in sc.axis:
        ax.plot([MARGIN_LEFT - 10, sc.width - 200], [y, y], color="#eeeeee", lw=1, zorder=0)
        ax.text(8, y, label, ha="left", va="center", fontsize=(FONT_PX + 1) * pt, color="#555555")
    if sc.axis:
        ax.plot([MARGIN_LEFT - 14] * 2, [MARGIN, sc.height - MARGIN], color="#999999", lw=1, zorder=0)
    for p in sc.edges:
        xs, ys = zip(*p.points)
        ax.plot(xs, ys, color=p.colour, alpha=0.75, lw=p.width * pt * 1.3, zorder=1,
                linestyle=(0, p.dash) if p.dash else "-", solid_capstyle="butt")
        ax.add_patch(Polygon(_arrow_head(p.points, 6 + p.width), closed=True, color=p.colour, zorder=1))
    for s in sc.nodes:
        if s.circle:
            ax.add_patch(Circle((s.x, s.y), s.w / 2, fc=s.fill, ec=s.stroke, lw=0.8, zorder=2))
        else:
            ax.add_patch(FancyBboxPatch((s.x - s.w / 2 + 3, s.y - s.h / 2 + 3), s.w - 6, s.h - 6,
                                        boxstyle="round,pad=3", fc=s.fill, ec=s.stroke, lw=0.8, zorder=2))
        top = s.y - (len(s.lines) - 1) * 6
        for i, line in enumerate(s.lines):
            ax.text(s.x, top + i * 12, line, ha="center", va="center", fontsize=FONT_PX * pt, zorder=3)
    x0 = sc.width - 190
    for i, side in enumerate(sc.legend):
        y = MARGIN + 10 + i * 16
        ax.plot([x0, x0 + 24], [y, y], color=SIDE_COLOURS[side], lw=1.6,
                linestyle=(0, SIDE_DASHES[side]) if SIDE_DASHES[side] else "-")
        ax.text(x0 + 30, y, LEGEND[side], va="center", fontsize=FONT_PX * pt)
    fig.savefig(target, format="png", dpi=dpi)
    plt.close(fig)


def render_graph(graph, fmt: str, out: str | Path | None = None) -> str | None:
    """The graph as text in `fmt` (graphml, dot, html), or a PNG file at `out` (required for png)."""
    if fmt == "png":
        if out is None:
            raise CatalogError("--format png needs --out FILE.png")
        to_png(graph, out)
        return None
    if fmt not in GRAPH_FORMATS:
        raise CatalogError(f"unknown graph format '{fmt}' (choose from {', '.join(GRAPH_FORMATS)})")
    return formats.get(fmt).render(graph)
