"""The catalog's ACC++ rows in the reference library's terms, for the reference tests
(test_accpp_reference.py on GPT-2, test_accpp_families.py on the other families).

The reference names a component (upstream layer, component id, token): a head slice by its
head id and source token, the others by ids n_heads + 0..3 (MLP, AH bias, Embedding, AH offset)
at the token they write to, the embedding and the offset under layer 0.
"""

SIDES = {"query": "dest", "key": "src"}
KIND_OFFSETS = {"mlp": 0, "attn_bias": 1, "embed": 2, "offset": 3}  # component id = n_heads + this
GRAPH_NAMES = {"MLP": "MLP", "b_O": "AH bias", "embed": "Embedding", "offset": "AH offset"}


def component_key(kind, up_layer, up_head, up_src, written, n_heads) -> tuple:
    if kind == "head":
        return (up_layer, up_head, up_src)
    return (up_layer if up_layer is not None else 0, n_heads + KIND_OFFSETS[kind], written)


def stored_decompositions(con, run_id, n_heads) -> dict:
    """{(prompt, layer, head, dest, src): {side: {(up_layer, component id, token): (svs, weight)}}}."""
    found = {}
    for row in con.execute("""
            SELECT e.prompt_id, e.layer, e.head, e.dest_pos, e.src_pos, e.side, e.up_kind, e.up_layer, e.up_head,
                   e.up_src_pos, e.weight, list(s.sv ORDER BY s.rank)
            FROM edges e JOIN edge_svs s USING (run_id, prompt_id, edge_id)
            WHERE e.run_id = ? GROUP BY ALL""", [run_id]).fetchall():
        prompt, layer, head, dest, src, side, kind, up_layer, up_head, up_src, weight, svs = row
        key = component_key(kind, up_layer, up_head, up_src, dest if side == "query" else src, n_heads)
        found.setdefault((prompt, layer, head, dest, src), {"query": {}, "key": {}})[side][key] = (svs, weight)
    return found


def stored_seeds(con, run_id, prompt_id, n_heads) -> dict:
    """{(layer, component id, token): weight} of one prompt's seeds."""
    return {component_key(kind, layer, head, src, pos, n_heads): weight
            for kind, layer, head, src, pos, weight in con.execute(
                "SELECT up_kind, up_layer, up_head, up_src_pos, pos, weight FROM seeds WHERE run_id = ? "
                "AND prompt_id = ?", [run_id, prompt_id]).fetchall()}


def tie(reference_firing, side, component, ours, theirs) -> bool:
    """Two orders of the same sv list that differ only where the reference's IG values of the
    swapped atoms (this component's, at these svs) are equal within float32 precision."""
    if sorted(ours) != sorted(theirs):
        return False
    atoms = reference_firing[f"{SIDES[side]}_atoms_in_ig_order"]  # [layer, comp id, sv, token, IG, selected]
    ig = {a[2]: a[4] for a in atoms if (a[0], a[1], a[3]) == component}
    scale = max(abs(a[4]) for a in atoms)
    return all(abs(ig[a] - ig[b]) <= 1e-6 * scale for a, b in zip(ours, theirs) if a != b)


def reference_label(node: str, tokens: dict[int, str], root: str) -> str:
    """Our node name ("L9H9@16>0", "MLP 3@16", "offset@16", "root") in the reference's label form."""
    if node == "root":
        return root
    name, _, positions = node.partition("@")
    if ">" in positions:  # a firing
        layer, head = (int(x) for x in name[1:].split("H"))
        dest, src = (int(x) for x in positions.split(">"))
        return str((layer, head, tokens[dest], tokens[src]))
    t = tokens[int(positions)]
    kind, _, layer = name.partition(" ")
    return str((int(layer) if layer else 0, GRAPH_NAMES[kind], t, t))
