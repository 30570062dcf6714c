// Hand-written SVG: the mesh around this node, and the route of one sent message.
import { clip, s, replace } from "./dom.js";

const W = 640, H = 420, CX = W / 2, CY = H / 2;

function ring(items, radius, offset) {
  const n = items.length;
  return items.map((item, i) => {
    const angle = offset + (2 * Math.PI * i) / Math.max(n, 1) - Math.PI / 2;
    return { item, x: CX + radius * Math.cos(angle), y: CY + radius * Math.sin(angle) };
  });
}

function peerNode({ x, y, id, label, kind, selected, onSelect }) {
  const g = s("g", {
    class: `peer ${kind}${selected ? " selected" : ""}`, transform: `translate(${x.toFixed(1)},${y.toFixed(1)})`,
    tabindex: 0, role: "button", "data-agent-id": id, "aria-label": label,
    onclick: () => onSelect(id),
    onkeydown: (e) => { if (e.key === "Enter" || e.key === " ") { e.preventDefault(); onSelect(id); } },
  }, [
    s("title", {}, label),
    s("circle", { r: 20 }),
    s("text", { class: "initial", "text-anchor": "middle", dy: "0.35em" }, (label || "?").slice(0, 1).toUpperCase()),
    s("text", { class: "label", "text-anchor": "middle", y: 36 }, clip(label, 18)),
  ]);
  return g;
}

// The mesh: this node in the middle, connections on the inner ring (edge colour = health, label = transport),
// discovered peers and peers asking to connect on the outer ring.
export function drawMesh(svg, state, selected, onSelect) {
  const me = state.node;
  const conns = state.connections;
  const outer = [
    ...state.pending.incoming.map((r) => ({ id: r.from_agent_id, label: r.display_name || r.from_agent_id, kind: "pending" })),
    ...state.discovered.map((d) => ({ id: d.agent_id, label: d.display_name || d.url || d.agent_id, kind: "discovered" })),
  ];
  const edges = [], nodes = [];
  for (const { item: c, x, y } of ring(conns, conns.length > 8 ? 150 : 130, Math.PI / 5)) {
    const mx = CX + (x - CX) * 0.6, my = CY + (y - CY) * 0.6;
    edges.push(s("line", { class: `edge ${c.health}`, x1: CX, y1: CY, x2: x, y2: y }));
    edges.push(s("text", { class: "edge-label", x: mx, y: my - 4, "text-anchor": "middle" }, c.transport));
    nodes.push(peerNode({ x, y, id: c.agent_id, label: c.display_name || c.agent_id, kind: `connection ${c.health}`,
                          selected: selected === c.agent_id, onSelect }));
  }
  for (const { item: p, x, y } of ring(outer, 190, Math.PI / Math.max(outer.length, 1))) {
    if (p.kind === "pending") edges.push(s("line", { class: "edge pending", x1: CX, y1: CY, x2: x, y2: y }));
    nodes.push(peerNode({ x, y, id: p.id, label: p.label, kind: p.kind, selected: selected === p.id, onSelect }));
  }
  const self = s("g", { class: "peer self", transform: `translate(${CX},${CY})`, "data-agent-id": me.agent_id }, [
    s("title", {}, "this node"),
    s("circle", { r: 28 }),
    s("text", { class: "initial", "text-anchor": "middle", dy: "0.35em" }, "you"),
    s("text", { class: "label", "text-anchor": "middle", y: 46 }, clip(me.display_name || me.agent_id, 22)),
  ]);
  const empty = conns.length || outer.length ? null
    : s("text", { class: "hint", x: CX, y: CY + 80, "text-anchor": "middle" }, "No connections yet: connect to a node's URL below.");
  replace(svg, [...edges, self, ...nodes, empty]);
}

// One sent message's route as a tree: this node, the recipients it sent to (edge = delivery state), and every
// forwarded hop reported through the webhook; each node shows how far it got (receipts, responded, expired).
export function drawRoute(sent, nameOf) {
  const children = new Map([["@me", []]]);
  const edgeLabel = new Map();
  const add = (parent, child, label) => {
    if (children.has(child)) return;
    if (!children.has(parent)) add("@me", parent, "?");
    children.get(parent).push(child);
    children.set(child, []);
    edgeLabel.set(child, label);
  };
  for (const [agent, d] of Object.entries(sent.deliveries || {})) add("@me", agent, d.state || "queued");
  for (const agent of sent.routed_to || []) add("@me", agent, "delivered");
  for (const u of sent.updates || []) {
    if (u.type === "forwarded" && u.target_agent_id) add(u.agent_id, u.target_agent_id, "forwarded");
  }
  const marks = new Map();
  const mark = (agent, m) => marks.set(agent, [...(marks.get(agent) || []), m]);
  for (const r of sent.receipts || []) mark(r.agent_id, r.state);
  for (const u of sent.updates || []) if (u.type === "expired") mark(u.agent_id, "expired");
  for (const r of sent.responses || []) mark(r.agent_id, "responded");

  // Layout: depth to the right, leaves top to bottom.
  const pos = new Map();
  let row = 0, depthMax = 0;
  const place = (id, depth) => {
    depthMax = Math.max(depthMax, depth);
    const kids = children.get(id) || [];
    if (!kids.length) { pos.set(id, { depth, row: row++ }); return; }
    kids.forEach((k) => place(k, depth + 1));
    const rows = kids.map((k) => pos.get(k).row);
    pos.set(id, { depth, row: (Math.min(...rows) + Math.max(...rows)) / 2 });
  };
  place("@me", 0);
  const colW = 230, rowH = 46, boxW = 140, boxH = 32;
  const width = (depthMax + 1) * colW + 20, height = Math.max(row, 1) * rowH + 10;
  const at = (id) => ({ x: 10 + pos.get(id).depth * colW, y: 8 + pos.get(id).row * rowH });
  const parts = [];
  for (const [parent, kids] of children) {
    for (const kid of kids) {
      const a = at(parent), b = at(kid);
      const label = edgeLabel.get(kid);
      parts.push(s("path", { class: `hop ${label}`, d: `M${a.x + boxW},${a.y + boxH / 2} C${a.x + boxW + 20},${a.y + boxH / 2} ${b.x - 20},${b.y + boxH / 2} ${b.x},${b.y + boxH / 2}` }));
      parts.push(s("text", { class: "hop-label", x: b.x - 8, y: b.y + boxH / 2 - 6, "text-anchor": "end" }, label));
    }
  }
  for (const id of children.keys()) {
    const { x, y } = at(id);
    const m = marks.get(id) || [];
    const delivery = edgeLabel.get(id);
    const cls = m.includes("responded") ? "responded" : m.includes("read") ? "read" : m.includes("expired") ? "expired"
      : delivery === "failed" ? "failed" : delivery === "queued" ? "queued" : "";
    parts.push(s("g", { class: `hop-node ${id === "@me" ? "me" : ""} ${cls}`, transform: `translate(${x},${y})`, "data-agent-id": id }, [
      s("title", {}, id === "@me" ? "you" : `${nameOf(id)} (${id})${m.length ? ": " + m.join(", ") : ""}`),
      s("rect", { width: boxW, height: boxH, rx: 6 }),
      s("text", { x: 8, y: m.length ? 14 : 20 }, clip(id === "@me" ? "you" : nameOf(id), 19)),
      s("text", { class: "marks", x: 8, y: 27 }, clip(m.join(" · "), 24)),
    ]));
  }
  return s("svg", { class: "route", viewBox: `0 0 ${width} ${height}`, width, height, role: "img",
                    "aria-label": "route of this message" }, parts);
}
