// The circuit explorer: plain JavaScript over the service's JSON API (/api/v1/), no libraries,
// no network beyond this server. Views, chosen by the URL's hash:
//   #/heads?dest_role=end        the layer x head grid, coloured by how often each head fires
//   #/head/L9H9                  one head: spectrum, roles, signal sizes, directions, neighbours
//   #/firing/0/L9H9/16/5         one firing: the prompt, its sparse signal, its edges
//   #/circuit?roots=L9H9&...     the traced circuit: layers up, token roles (or positions) across
//   #/jobs                       the service's ingest jobs, with a cancel button for those queued or running
"use strict";

const state = { runs: [], run: null, roles: [], lastDestRole: "any" };
const view = document.getElementById("view");
const tooltip = document.getElementById("tooltip");
const SVG = "http://www.w3.org/2000/svg";

// -- small helpers -----------------------------------------------------------------------------

function esc(value) {
  return String(value ?? "").replace(/[&<>"']/g, c => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"})[c]);
}

function fmt(value) {
  if (value === null || value === undefined) return "";
  if (typeof value === "number" && !Number.isInteger(value)) return value.toPrecision(4);
  if (Array.isArray(value)) return value.map(v => v !== null && typeof v === "object" && "sv" in v ? svText(v) : v).join(" ");
  return String(value);
}

// A singular direction an edge writes through, {sv, share}, as "sv:share".
// A direction's name: its index, or on a rotary model its form's offset and index ("d3:sv0"),
// since the same index is a different direction at each offset.
const svName = s => (s.pos_offset === undefined || s.pos_offset === null) ? `${s.sv}` : `d${s.pos_offset}:sv${s.sv}`;
const svText = s => `${svName(s)}:${s.share === null ? "" : s.share.toFixed(2)}`;

async function api(path, params = {}) {
  const query = new URLSearchParams();
  for (const [k, v] of Object.entries(params)) {
    if (Array.isArray(v)) v.forEach(item => query.append(k, item));
    else if (v !== null && v !== undefined && v !== "") query.append(k, v);
  }
  const response = await fetch(`/api/v1/${path}${query.toString() ? "?" + query : ""}`);
  const body = await response.json().catch(() => ({error: response.statusText}));
  if (!response.ok) throw new Error(body.error || response.statusText);
  return body;
}

function showError(message) {
  const box = document.getElementById("error");
  box.textContent = message || "";
  box.hidden = !message;
}

function hashParams() {
  const [path, query] = location.hash.replace(/^#/, "").split("?");
  return { path: path || "/", params: new URLSearchParams(query || "") };
}

function go(path, params = {}) {
  const query = new URLSearchParams(Object.entries(params).filter(([, v]) => v !== null && v !== undefined && v !== ""));
  location.hash = path + (query.toString() ? "?" + query : "");
}

function table(rows, columns, cell = {}) {
  if (!rows.length) return "<p><em>none</em></p>";
  const head = columns.map(c => `<th>${esc(c)}</th>`).join("");
  const body = rows.map(row => "<tr>" + columns.map(c => {
    const value = row[c];
    const html = cell[c] ? cell[c](value, row) : esc(fmt(value));
    return `<td class="${typeof value === "number" ? "num" : ""}">${html}</td>`;
  }).join("") + "</tr>").join("");
  return `<table data-rows="${rows.length}"><thead><tr>${head}</tr></thead><tbody>${body}</tbody></table>`;
}

const noRole = role => role === null ? "<em>(none)</em>" : esc(role);
const headLink = name => `<a href="#/head/${esc(name)}" class="head-link">${esc(name)}</a>`;

function roleOptions(selected, withAny = true) {
  const roles = (withAny ? ["any"] : []).concat(state.roles);
  return roles.map(r => `<option value="${esc(r)}"${r === selected ? " selected" : ""}>${esc(r)}</option>`).join("");
}

// Vertical bars, one per item, as inline SVG (spectra and histograms).
function bars(items, label, value, title) {
  const w = 16, h = 90, max = Math.max(...items.map(value), 1e-9);
  const parts = items.map((item, i) => {
    const bh = Math.max(1, h * value(item) / max);
    return `<rect class="bar" x="${30 + i * w}" y="${10 + h - bh}" width="${w - 3}" height="${bh}"><title>${esc(title(item))}</title></rect>` +
           `<text class="axis" x="${30 + i * w + (w - 3) / 2}" y="${h + 22}" text-anchor="middle">${esc(label(item))}</text>`;
  });
  return `<svg width="${40 + items.length * w}" height="${h + 30}">${parts.join("")}` +
         `<text class="axis" x="2" y="16">${esc(fmt(max))}</text></svg>`;
}

// -- run picker -------------------------------------------------------------------------------

async function loadRuns() {
  state.runs = await api("runs");
  const finished = state.runs.filter(r => r.status === "finished");
  const picker = document.getElementById("run-picker");
  picker.innerHTML = state.runs.map(r =>
    `<option value="${r.run_id}">run ${r.run_id}: ${esc(r.dataset)}, ${r.n_prompts} prompts, ${esc(r.status)}` +
    `${r.status !== "finished" ? ` (${r.prompts_done}/${r.n_prompts})` : ""}</option>`).join("");
  const wanted = Number(sessionStorage.getItem("run")) || (finished.length ? finished[finished.length - 1].run_id : null);
  state.run = state.runs.some(r => r.run_id === wanted) ? wanted : (state.runs[0] || {}).run_id ?? null;
  picker.value = state.run ?? "";
  await loadRunDetails();
}

async function loadRunDetails() {
  const run = state.runs.find(r => r.run_id === state.run);
  document.getElementById("run-info").textContent = run ?
    `model ${run.model_name} (${run.n_layers}x${run.n_heads}), ${run.firings} firings, ${run.edges} edges` : "no runs yet";
  state.roles = run ? await api("roles", {run_id: state.run}) : [];
}

document.getElementById("run-picker").addEventListener("change", async event => {
  state.run = Number(event.target.value);
  sessionStorage.setItem("run", state.run);
  await loadRunDetails();
  route();
});

// -- the layer x head grid ------------------------------------------------------------------------

async function showGrid(params) {
  const dest = params.get("dest_role") || "any", src = params.get("src_role") || "any";
  state.lastDestRole = dest;
  const grid = await api("heads", {run_id: state.run, dest_role: dest, src_role: src});
  const max = Math.max(...grid.heads.map(h => h.n_firings), 1);
  const byLayer = {};
  grid.heads.forEach(h => { (byLayer[h.layer] = byLayer[h.layer] || [])[h.head] = h; });
  let rows = "";
  for (let layer = grid.n_layers - 1; layer >= 0; layer--) {
    rows += `<tr><th>layer ${layer}</th>` + (byLayer[layer] || []).map(h => {
      const a = h.n_firings / max;
      const name = `L${h.layer}H${h.head}`;
      return `<td class="cell" data-head="${name}" data-firings="${h.n_firings}" ` +
             `style="background: rgba(31,119,180,${a.toFixed(3)}); color: ${a > 0.55 ? "#fff" : "#222"}" ` +
             `title="${name}: ${h.n_firings} firings in ${h.n_prompts} prompts">${name}<br>${h.n_firings}</td>`;
    }).join("") + "</tr>";
  }
  const headsRow = "<tr><th></th>" + Array.from({length: grid.n_heads}, (_, i) => `<th>head ${i}</th>`).join("") + "</tr>";
  view.innerHTML = `
    <h2>Which heads fire</h2>
    <div class="controls">
      <label>destination role <select id="grid-dest">${roleOptions(dest)}</select></label>
      <label>source role <select id="grid-src">${roleOptions(src)}</select></label>
      <span class="legend">colour: firings of each head in run ${grid.run_id} (darkest: ${max}); click a head to open it</span>
    </div>
    <table class="grid" id="head-grid">${rows}${headsRow}</table>`;
  const refilter = () => go("/heads", {dest_role: document.getElementById("grid-dest").value,
                                       src_role: document.getElementById("grid-src").value});
  document.getElementById("grid-dest").addEventListener("change", refilter);
  document.getElementById("grid-src").addEventListener("change", refilter);
  view.querySelectorAll("td.cell").forEach(td => td.addEventListener("click", () => go(`/head/${td.dataset.head}`)));
}

// -- one head -------------------------------------------------------------------------------

async function showHead(name) {
  const head = await api(`heads/${encodeURIComponent(name)}`, {run_id: state.run, top: 16});
  const firings = await api(`heads/${encodeURIComponent(name)}/firings`, {run_id: state.run, limit: 10});
  const activity = head.activity[0] || {};
  const destDefault = state.roles.includes(state.lastDestRole) ? state.lastDestRole : (state.roles.includes("end") ? "end" : "any");
  view.innerHTML = `
    <h2 id="head-title">Head ${esc(head.name)} <small>(run ${head.run_id})</small></h2>
    <p id="activity">${activity.n_firings} firings in ${activity.n_prompts} of ${activity.n_prompts_run} prompts;
       mean attention ${fmt(activity.mean_attn)}, mean score ${fmt(activity.mean_score)},
       mean signal size ${fmt(activity.mean_n_svs)} singular directions</p>
    ${head.notes.length ? `<ul id="head-notes" class="notes">${head.notes.map(n => `<li>${esc(n)}</li>`).join("")}</ul>` : ""}
    <div class="controls">
      <strong>Why does it fire?</strong>
      <label>from destination role <select id="trace-dest">${roleOptions(destDefault)}</select></label>
      <label>to source role <select id="trace-src">${roleOptions("any")}</select></label>
      <button id="trace-button">trace the circuit</button>
    </div>
    <div class="cols">
      <section><h3>Spectrum (top singular values)</h3><div id="spectrum">${
        bars(head.spectrum, s => s.sv, s => s.sigma ?? 0,
             s => s.stored === false ? `sv ${s.sv}: not stored (no stored signal uses it)` : `sv ${s.sv}: sigma ${fmt(s.sigma)}`)}</div></section>
      <section><h3>Signal size (singular directions per firing)</h3><div id="signal-size">${
        bars(head.signal_size, s => s.n_svs, s => s.n_firings, s => `${s.n_svs} directions: ${s.n_firings} firings`)}</div></section>
      <section><h3>Firing roles</h3><div id="role-pairs">${table(head.role_pairs, ["dest_role", "src_role", "n_firings", "n_prompts"],
        {dest_role: noRole, src_role: noRole})}</div></section>
      <section><h3>Most used singular directions</h3><div id="top-svs">${
        table(head.top_svs, (head.top_svs.length && "pos_offset" in head.top_svs[0] ? ["pos_offset"] : [])
          .concat(["sv", "sigma", "n_firings", "share_of_firings", "mean_contribution"]))}</div></section>
      ${head.side_shares ? `<section><h3>Who writes each side (median shares; edges cover only the heads' part)</h3><div id="side-shares">${
        table(head.side_shares, ["firings", "side", "n_firings", "head_share", "mlp_share", "attn_bias_share", "embed_share", "offset_share"])
      }</div></section>` : ""}
      <section><h3>Upstream heads (edges into ${esc(head.name)})</h3><div id="upstream">${
        table(head.upstream, ["upstream", "side", "n_prompts", "n_firings", "mean_weight", "top_svs"],
              {upstream: (u, row) => row.up_kind === "head" ? headLink(u) : esc(u)})}</div></section>
      <section><h3>Downstream heads (edges from ${esc(head.name)})</h3><div id="downstream">${
        table(head.downstream, ["downstream", "side", "token_role", "n_prompts", "mean_weight", "top_svs"], {downstream: headLink})}</div></section>
      <section><h3>Strongest firings (click one for its signal)</h3><div id="firings">${
        table(firings, ["prompt_id", "dest_token", "src_token", "dest_role", "src_role", "attn_weight", "n_svs"], {
          prompt_id: (p, f) => `<a class="firing-link" href="#/firing/${p}/${esc(head.name)}/${f.dest_pos}/${f.src_pos}">prompt ${p}: ${f.dest_pos} &rarr; ${f.src_pos}</a>`,
          dest_role: noRole, src_role: noRole})}</div></section>
    </div>`;
  document.getElementById("trace-button").addEventListener("click", () => go("/circuit", {
    roots: head.name, dest_role: document.getElementById("trace-dest").value,
    src_role: document.getElementById("trace-src").value}));
}

// -- one firing -------------------------------------------------------------------------------

async function showFiring(promptId, name, dest, src) {
  const found = await api(`firings/${promptId}/${encodeURIComponent(name)}/${dest}/${src}`, {run_id: state.run});
  const tokens = (await api(`prompts/${promptId}`, {run_id: state.run})).tokens;
  const f = found.firing;
  const text = tokens.map(t => {
    const mark = t.pos === f.dest_pos ? "dest" : t.pos === f.src_pos ? "src" : "";
    return `<span class="tok ${mark}" title="${t.pos}${t.role ? " " + esc(t.role) : ""}">${esc(t.token)}</span>`;
  }).join("");
  view.innerHTML = `
    <h2 id="firing-title">${headLink(name)} fires from ${f.dest_pos} to ${f.src_pos} in prompt ${promptId}</h2>
    <p class="prompt">${text}</p>
    <p>attention ${fmt(f.attn_weight)}, score ${fmt(f.score)}; destination ${esc(f.dest_token)} (${noRole(f.dest_role)}),
       source ${esc(f.src_token)} (${noRole(f.src_role)}); its sparse signal has ${f.n_svs ?? "no"} singular directions</p>
    <div class="cols">
      <section><h3>Sparse signal</h3><div id="signal">${
        table(found.signal, ["rank", "sv", "sigma", "contribution", "share", "dest_proj", "src_proj"])}</div></section>
      <section><h3>Edges into this firing</h3><div id="firing-edges">${
        table(found.edges.map(e => ({...e, upstream: e.up_head !== null && e.up_head !== undefined ? `L${e.up_layer}H${e.up_head}` : (e.up_kind || "")})),
              ["upstream", "side", "weight"], {upstream: u => /^L\d+H\d+$/.test(u) ? headLink(u) : esc(u)})}</div></section>
    </div>`;
}

// -- the circuit ------------------------------------------------------------------------------

// The trace's pruning options: [query parameter, label, input step].
const PRUNE = [["min_count", "min count", "1"], ["min_weight", "min |weight|", "any"],
               ["max_depth", "max depth", "1"], ["top_k", "top k", "1"]];

async function showCircuit(params) {
  const roots = params.get("roots") || "";
  const dest = params.get("dest_role") || "end", src = params.get("src_role") || "IO";
  const prompt = params.get("prompt");
  const prompts = await api("prompts", {run_id: state.run, limit: 200});
  const promptOptions = `<option value="">all prompts (by role)</option>` + prompts.map(p =>
    `<option value="${p.prompt_id}"${String(p.prompt_id) === prompt ? " selected" : ""}>${p.prompt_id}: ${esc(p.text.slice(0, 60))}</option>`).join("");
  // Pruning, as the CLI's trace --min-count, --min-weight, --max-depth, --top-k (empty: off).
  const prune = Object.fromEntries(PRUNE.map(([key]) => [key, params.get(key) || null]));
  const query = {roots: roots || null, dest_role: dest, src_role: src, prompt_id: prompt, run_id: state.run, ...prune};
  const download = f => "/api/v1/trace?" + new URLSearchParams(Object.entries({...query, format: f}).filter(([, v]) => v !== null && v !== ""));
  view.innerHTML = `
    <h2>Circuit</h2>
    <div class="controls">
      <label>root heads <input id="c-roots" value="${esc(roots)}" placeholder="default: from the data" size="14"></label>
      <label>destination role <select id="c-dest">${roleOptions(dest)}</select></label>
      <label>source role <select id="c-src">${roleOptions(src)}</select></label>
      <label>prompt <select id="c-prompt">${promptOptions}</select></label>
      ${PRUNE.map(([key, label, step]) => `<label title="prune: ${label}">${label} <input id="c-${key}" type="number" min="0" step="${step}" size="5" value="${esc(prune[key] ?? "")}"></label>`).join("\n      ")}
      <button id="c-trace">trace</button>
      <a href="${download("graphml")}">GraphML</a> <a href="${download("dot")}">DOT</a>
    </div>
    <p class="key-legend"><span><i class="swatch" style="border-color:#1f77b4"></i> query side</span>
      <span><i class="swatch" style="border-color:#d62728;border-top-style:dashed"></i> key side</span>
      <span><i class="swatch" style="border-color:#9a9a9a;border-top-style:dotted"></i> token node to its head</span>
      <span>width: |mean weight| x edges. Hover for details, click a head to open it, click a token node to pin its edges.</span></p>
    <div id="circuit">tracing...</div><p id="circuit-notes"></p>`;
  document.getElementById("c-trace").addEventListener("click", () => go("/circuit", {
    roots: document.getElementById("c-roots").value.trim(), dest_role: document.getElementById("c-dest").value,
    src_role: document.getElementById("c-src").value, prompt: document.getElementById("c-prompt").value,
    ...Object.fromEntries(PRUNE.map(([key]) => [key, document.getElementById(`c-${key}`).value.trim()]))}));
  const graph = await api("trace", {...query, picture: true});  // over a few hundred edges: pruned, with a note
  let columns;
  if (prompt) {
    const tokens = (await api(`prompts/${prompt}`, {run_id: state.run})).tokens;
    columns = tokens.map(t => ({key: String(t.pos), label: `${t.pos}:${t.token.trim()}` + (t.role ? ` (${t.role})` : "")}));
  } else {
    columns = state.roles.map(r => ({key: r, label: r}));
  }
  drawCircuit(graph, columns);
  document.getElementById("circuit-notes").textContent =
    `${graph.nodes.length} nodes, ${graph.edges.length} edges, ${graph.n_firings} firings reached` +
    (graph.notes.length ? "; " + graph.notes.join("; ") : "");
}

function drawCircuit(graph, columns) {
  const box = document.getElementById("circuit");
  if (!graph.nodes.length) { box.textContent = "nothing to draw: the roots have no firing between these roles"; return; }
  const colW = columns.length > 12 ? 72 : 120, rowH = 120, left = 70, top = 30;
  // Rows: a node's layer; nodes without one (ACC++: the output root on top, embed and offset
  // leaves at the bottom) get a row of their own.
  const known = graph.nodes.filter(n => n.layer !== null).map(n => n.layer);
  const topLayer = known.length ? Math.max(...known) : 0, bottomLayer = known.length ? Math.min(...known) : 0;
  const rowOf = n => n.layer ?? (n.kind === "root" ? topLayer + 1 : bottomLayer - 1);
  const rows = graph.nodes.map(rowOf);
  const maxLayer = Math.max(...rows), minLayer = Math.min(...rows);
  columns = columns.slice();
  const colIndex = Object.fromEntries(columns.map((c, i) => [c.key, i]));
  // Column: the token a node belongs to (a token node's role or position; for ACC++ nodes the
  // token after "@", its destination before ">"). Tokens not among the columns get one.
  const columnOf = n => {
    // (over all prompts, the tokens without a role are one node, role "other")
    const key = n.kind === "token" ? (graph.prompt_id !== null ? String(n.pos) : (n.role ?? "other"))
      : String(n.pos ?? "").split(">")[0];
    if (!(key in colIndex)) { colIndex[key] = columns.length; columns.push({key, label: key || "(output)"}); }
    return key;
  };
  const rowY = layer => top + (maxLayer - layer) * rowH + rowH / 2;
  const colX = key => left + colIndex[key] * colW + colW / 2;
  const pos = {};
  // Nodes other than heads: row and column as above, side by side within a cell (token nodes
  // of the 2024 method sit in the lower half of their head's row).
  const cells = {};
  graph.nodes.filter(n => n.kind !== "head").forEach(n => {
    const key = columnOf(n), cell = `${rowOf(n)}|${key}`;
    (cells[cell] = cells[cell] || []).push([n, key]);
  });
  Object.values(cells).forEach(list => list.forEach(([n, key], i) => {
    pos[n.node] = [colX(key) + (i - (list.length - 1) / 2) * 18, rowY(rowOf(n)) + (n.kind === "token" ? 26 : 0)];
  }));
  // Head nodes: above their token nodes, at their mean column; a head that nothing traced feeds
  // (layer 0, say) sits over the tokens it writes to. Then pushed apart within a layer.
  const heads = graph.nodes.filter(n => n.kind === "head");
  const mean = xs => xs.reduce((a, b) => a + b, 0) / xs.length;
  heads.forEach(h => {
    let xs = graph.nodes.filter(n => n.kind === "token" && n.node.startsWith(h.node + "@")).map(n => pos[n.node][0]);
    if (!xs.length) xs = graph.edges.filter(e => e.source === h.node && pos[e.target]).map(e => pos[e.target][0]);
    pos[h.node] = [xs.length ? mean(xs) : left + colW / 2, rowY(h.layer) - 26];
  });
  for (let layer = minLayer; layer <= maxLayer; layer++) {
    const row = heads.filter(h => h.layer === layer).sort((a, b) => pos[a.node][0] - pos[b.node][0]);
    for (let i = 1; i < row.length; i++) {
      const prev = pos[row[i - 1].node][0];
      if (pos[row[i].node][0] < prev + 34) pos[row[i].node][0] = prev + 34;
    }
  }
  const width = Math.max(left + (columns.length + 1) * colW, ...Object.values(pos).map(p => p[0] + 40));
  const height = top + (maxLayer - minLayer + 1) * rowH + 40;
  const svg = document.createElementNS(SVG, "svg");
  svg.setAttribute("width", width); svg.setAttribute("height", height);
  const add = (parent, tag, attrs, text) => {
    const el = document.createElementNS(SVG, tag);
    Object.entries(attrs).forEach(([k, v]) => el.setAttribute(k, v));
    if (text !== undefined) el.textContent = text;
    parent.appendChild(el);
    return el;
  };
  for (let layer = minLayer; layer <= maxLayer; layer++) {
    add(svg, "line", {class: "lane", x1: 0, x2: width, y1: rowY(layer) + rowH / 2, y2: rowY(layer) + rowH / 2});
    const label = layer > topLayer ? "output" : layer < bottomLayer ? "embed" : `layer ${layer}`;
    add(svg, "text", {class: "lane-label", x: 4, y: rowY(layer) + 4}, label);
  }
  columns.forEach(c => add(svg, "text", {class: "lane-label", x: colX(c.key), y: height - 8, "text-anchor": "middle"}, c.label));
  const strength = e => Math.abs(e.mean_weight ?? 0) * e.n_edges;
  const maxStrength = Math.max(...graph.edges.filter(e => e.kind !== "reads").map(strength), 1e-9);
  const edgeEls = graph.edges.map(e => {
    const [x1, y1] = pos[e.source], [x2, y2] = pos[e.target];
    const sideClass = e.kind === "reads" ? "reads" : e.side;
    const widthPx = e.kind === "reads" ? 1.2 : 1 + 6 * strength(e) / maxStrength;
    const bend = (y1 - y2) / 2;
    const path = add(svg, "path", {class: `edge ${sideClass}`, "stroke-width": widthPx.toFixed(2),
      d: `M${x1},${y1} C${x1},${y1 - bend} ${x2},${y2 + bend} ${x2},${y2}`,
      "data-source": e.source, "data-target": e.target, "data-side": e.side});
    path.addEventListener("mousemove", ev => showTip(ev, edgeTip(e, graph.prompt_id !== null)));
    path.addEventListener("mouseleave", hideTip);
    return [e, path];
  });
  let pinned = null;
  graph.nodes.forEach(n => {
    const [x, y] = pos[n.node];
    const g = add(svg, "g", {class: `node ${n.kind}${n.is_root ? " root" : ""}`, "data-node": n.node});
    add(g, "circle", {cx: x, cy: y, r: n.kind === "head" ? 13 : 7});
    // Token nodes need no label: their column says the role (or position), the tooltip the rest.
    if (n.kind === "head") add(g, "text", {x: x, y: y + 3.5, "text-anchor": "middle"}, n.node);
    else if (n.kind !== "token") add(g, "text", {x: x, y: y + 18, "text-anchor": "middle"}, n.node.split("@")[0]);
    g.addEventListener("mousemove", ev => showTip(ev, nodeTip(n, graph.edges)));
    g.addEventListener("mouseleave", hideTip);
    g.addEventListener("click", () => {
      if (n.kind === "head") { go(`/head/${n.node}`); return; }
      pinned = pinned === n.node ? null : n.node;
      svg.querySelectorAll(".node").forEach(el => el.classList.toggle("pinned", el.dataset.node === pinned));
      edgeEls.forEach(([e, el]) => el.classList.toggle("dim", pinned !== null && e.source !== pinned && e.target !== pinned));
    });
  });
  box.innerHTML = "";
  box.appendChild(svg);
}

function edgeTip(e, onePrompt) {
  if (e.kind === "reads") return `${e.source} -> ${e.target}\nhead reads this token (${e.side} side)\n` +
    `${e.count} ${onePrompt ? "firings" : "prompts"}, ${e.n_edges} edges`;
  return `${e.source} writes to ${e.target} (${e.side} side)\n` +
    `count: ${e.count} ${onePrompt ? "firings" : "prompts"}, ${e.n_edges} edges\n` +
    `mean weight: ${fmt(e.mean_weight)}\nsingular directions (sv:share): ${e.top_svs.map(svText).join(" ") || "none"}`;
}

function nodeTip(n, edges) {
  const into = edges.filter(e => e.target === n.node).length, out = edges.filter(e => e.source === n.node).length;
  const what = n.kind === "head" ? `head ${n.node}${n.is_root ? " (root)" : ""}\nclick to open its page` :
    n.kind !== "token" ? `${n.node} (${n.kind}${n.count ? `, in ${n.count} prompts` : ""})` +
      `${n.token ? `\n${n.token}` : ""}\nclick to pin its edges` :
    `${n.node.split("@")[0]} at ${n.pos !== null ? `position ${n.pos} '${(n.token || "").trim()}'` : ""}` +
    `${n.role ? ` role ${n.role}` : ""}\nclick to pin its edges`;
  return `${what}\n${into} edges in, ${out} out`;
}

function showTip(event, text) {
  tooltip.textContent = text;
  tooltip.hidden = false;
  tooltip.style.left = `${event.clientX + 14}px`;
  tooltip.style.top = `${event.clientY + 14}px`;
}

function hideTip() { tooltip.hidden = true; }

// -- ingest jobs ------------------------------------------------------------------------------

const ACTIVE_JOBS = ["queued", "running"];
let jobsTimer = null;  // while a job is queued or running, the jobs view reloads itself

async function showJobs() {
  const jobs = (await api("jobs")).slice().reverse();  // newest first
  const rows = jobs.map(j => ({
    job: j.job_id, status: j.status, run: j.run_id, model: j.settings.model_path || j.settings.model,
    method: j.settings.method, prompts: j.progress ? `${j.progress.prompts_done} of ${j.progress.n_prompts}` : `0 of ${j.settings.n_prompts}`,
    "prompts/s": j.prompts_per_s, message: j.message, "": j}));
  view.innerHTML = `
    <h2>Ingest jobs</h2>
    <p class="legend">The jobs this service accepted (POST /api/v1/runs, or <code>circuit-catalog ingest --server</code>).
      Cancelling keeps what a job committed: submitting the same settings again resumes its run.</p>
    <div id="jobs">${table(rows, Object.keys(rows[0] || {job: 0}), {
      status: value => `<span class="job-status">${esc(value)}</span>`,
      "": j => ACTIVE_JOBS.includes(j.status)
        ? `<button class="cancel" data-job="${j.job_id}">${j.cancel_requested ? "cancelling" : "cancel"}</button>` : ""})}</div>`;
  view.querySelectorAll("#jobs tbody tr").forEach((tr, i) => tr.dataset.job = jobs[i].job_id);
  view.querySelectorAll("button.cancel").forEach(button => button.addEventListener("click", async () => {
    button.disabled = true;
    // Same origin, the token in the cookie: the service's Origin check lets it through.
    const response = await fetch(`/api/v1/jobs/${button.dataset.job}`, {method: "DELETE"});
    const body = await response.json().catch(() => ({error: response.statusText}));
    if (!response.ok) showError(body.error || response.statusText);
    await showJobs();
  }));
  clearTimeout(jobsTimer);
  if (jobs.some(j => ACTIVE_JOBS.includes(j.status))) {
    jobsTimer = setTimeout(() => {
      if (hashParams().path === "/jobs") showJobs().catch(err => showError(err.message));
    }, 1000);
  }
}

// -- routing ------------------------------------------------------------------------------------

async function route() {
  showError(null);
  hideTip();
  const {path, params} = hashParams();
  clearTimeout(jobsTimer);
  try {
    if (path === "/jobs") { await showJobs(); return; }
    if (state.run === null) { view.innerHTML = "<p>The catalog has no runs yet: submit an ingest (POST /api/v1/runs).</p>"; return; }
    if (path.startsWith("/head/")) await showHead(decodeURIComponent(path.slice(6)));
    else if (path.startsWith("/firing/")) await showFiring(...path.slice(8).split("/").map(decodeURIComponent));
    else if (path === "/circuit") await showCircuit(params);
    else await showGrid(params);
  } catch (err) {
    showError(err.message);
  }
}

window.addEventListener("hashchange", route);
loadRuns().then(route).catch(err => showError(err.message));
