// The DarkMatter console: renders the node's snapshot, stays live over server-sent events, and calls actions.
import { ago, clip, h, replace, shortId } from "./dom.js";
import { drawMesh, drawRoute } from "./graph.js";

const csrf = document.querySelector('meta[name="dm-csrf"]').content;
const $ = (id) => document.getElementById(id);

let state = null;
let selectedPeer = null;
let openMessage = null;      // message_id shown in the detail panel
let openContent = null;      // its full text, once fetched
const known = { inbox: null, pending: null, responses: null };
let unseen = 0;
let baseTitle = "DarkMatter console";

// --- talking to the node -------------------------------------------------------------------------

async function act(name, body) {
  const reply = await fetch(`/ui/api/action/${name}`, {
    method: "POST", credentials: "same-origin",
    headers: { "Content-Type": "application/json", "X-DM-CSRF": csrf },
    body: JSON.stringify(body),
  });
  let data = {};
  try { data = await reply.json(); } catch { /* not JSON */ }
  if (!reply.ok) throw new Error(data.error || `HTTP ${reply.status}`);
  return data;
}

function notify(text, kind = "ok") {
  const box = $("notice");
  box.textContent = text;
  box.className = `notice ${kind}`;
  box.hidden = false;
  clearTimeout(notify.timer);
  notify.timer = setTimeout(() => { box.hidden = true; }, kind === "error" ? 10000 : 5000);
}

async function run(button, label, work) {
  if (button) button.disabled = true;
  try {
    const result = await work();
    notify(label(result), result && result.success === false ? "error" : "ok");
    return result;
  } catch (err) {
    notify(err.message, "error");
    return null;
  } finally {
    if (button) button.disabled = false;
  }
}

// --- names ----------------------------------------------------------------------------------------

function nameOf(id) {
  if (!state || !id) return shortId(id);
  if (id === state.node.agent_id) return "you";
  const c = state.connections.find((x) => x.agent_id === id);
  if (c && c.display_name) return c.display_name;
  const d = state.discovered.find((x) => x.agent_id === id);
  if (d && d.display_name) return d.display_name;
  const p = state.pending.incoming.find((x) => x.from_agent_id === id);
  if (p && p.display_name) return p.display_name;
  return shortId(id);
}

// --- the unmissable sign --------------------------------------------------------------------------

function arrivals(next) {
  const inboxIds = new Set(next.inbox.map((m) => m.message_id));
  const pendingIds = new Set(next.pending.incoming.map((r) => r.request_id));
  const responses = next.sent.reduce((n, m) => n + m.responses.length, 0);
  const news = [];
  if (known.inbox !== null) {
    for (const m of next.inbox) if (!known.inbox.has(m.message_id)) news.push({ kind: "message", text: `New message from ${nameOf(m.from_agent_id)}`, id: m.message_id });
    for (const r of next.pending.incoming) if (!known.pending.has(r.request_id)) news.push({ kind: "request", text: `${r.display_name || shortId(r.from_agent_id)} asks to connect` });
    if (responses > known.responses) news.push({ kind: "response", text: "New response to a message you sent" });
  }
  known.inbox = inboxIds;
  known.pending = pendingIds;
  known.responses = responses;
  return news;
}

function signal(news) {
  if (!news.length) return;
  unseen += news.length;
  const alert = $("alert");
  alert.textContent = `● ${news[news.length - 1].text}${unseen > 1 ? ` (+${unseen - 1} more)` : ""} — show`;
  alert.dataset.kind = news[news.length - 1].kind;
  alert.dataset.messageId = news[news.length - 1].id || "";
  alert.hidden = false;
  alert.classList.remove("pulse");
  void alert.offsetWidth; // restart the animation
  alert.classList.add("pulse");
  for (const n of news) if (n.id) fresh.add(n.id);
  document.title = `(${unseen}) ${baseTitle}`;
}

const fresh = new Set();

function acknowledge() {
  const alert = $("alert");
  const kind = alert.dataset.kind;
  alert.hidden = true;
  unseen = 0;
  document.title = baseTitle;
  const target = kind === "request" ? "pending" : kind === "response" ? "sent" : "inbox";
  $(target).scrollIntoView({ behavior: "smooth", block: "start" });
  if (kind === "message" && alert.dataset.messageId) openInbox(alert.dataset.messageId);
}

// --- rendering ------------------------------------------------------------------------------------

function render(next) {
  const news = arrivals(next);
  state = next;
  const me = state.node;
  baseTitle = `DarkMatter — ${me.display_name || shortId(me.agent_id)}`;
  document.title = unseen ? `(${unseen}) ${baseTitle}` : baseTitle;
  $("node-name").textContent = me.display_name || shortId(me.agent_id);
  $("node-name").title = me.agent_id;
  $("node-meta").textContent = `${me.url} · ${me.status} · ${me.is_genesis ? "auto-accepts connections (genesis)" : "you decide on connection requests"} · protocol ${me.protocol_version}`;
  drawMesh($("graph"), state, selectedPeer, selectPeer);
  renderPeer();
  renderPending();
  renderInbox();
  renderSent();
  renderNode();
  signal(news);
}

function field(label, value) {
  return [h("dt", {}, label), h("dd", {}, value ?? "—")];
}

function renderPeer() {
  const box = $("peer-details");
  const typing = document.activeElement;
  if (typing && typing.tagName === "TEXTAREA" && box.contains(typing)) return; // do not wipe what is being typed
  if (!selectedPeer) { replace(box, h("p", { class: "muted" }, "Click a peer for its details.")); return; }
  const conn = state.connections.find((c) => c.agent_id === selectedPeer);
  const disc = state.discovered.find((d) => d.agent_id === selectedPeer);
  const req = state.pending.incoming.find((r) => r.from_agent_id === selectedPeer);
  if (!conn && !disc && !req) { selectedPeer = null; renderPeer(); return; }
  const title = h("h3", {}, nameOf(selectedPeer));
  if (conn) {
    replace(box, [title, h("dl", {}, [
      ...field("agent id", conn.agent_id), ...field("URL", conn.url), ...field("bio", conn.bio),
      ...field("transport", conn.transport), ...field("health", `${conn.health}${conn.health_failures ? ` (${conn.health_failures} failed checks)` : ""}`),
      ...field("last contact", ago(conn.last_contact)), ...field("connected", `${ago(conn.connected_at)} (${conn.direction})`),
      ...field("messages", `${conn.messages_sent} sent, ${conn.messages_received} received`),
      ...field("protocol", conn.protocol_version), ...field("your impression", conn.impression),
    ]), impressionForm(conn.agent_id, conn.impression), h("div", { class: "row" }, [
      h("button", { id: "peer-message", type: "button", onclick: () => { $("send-to").value = conn.agent_id; $("send-text").focus(); } }, "Message"),
      h("button", { id: "peer-disconnect", class: "danger", type: "button", onclick: (e) => {
        if (!confirm(`Disconnect from ${nameOf(conn.agent_id)}?`)) return;
        run(e.target, () => "Disconnected.", () => act("disconnect", { agent_id: conn.agent_id }));
      } }, "Disconnect"),
    ])]);
  } else if (req) {
    replace(box, [title, h("p", { class: "muted" }, "asks to connect"), h("dl", {}, [
      ...field("agent id", req.from_agent_id), ...field("URL", req.url), ...field("bio", req.bio),
      ...field("asked", ago(req.requested_at)), ...field("signed", req.signed ? "yes" : "no"),
    ]), pendingButtons(req)]);
  } else {
    replace(box, [title, h("p", { class: "muted" }, `discovered (${disc.source || "?"}), not connected`), h("dl", {}, [
      ...field("agent id", disc.agent_id), ...field("URL", disc.url), ...field("bio", disc.bio),
      ...field("last seen", ago(disc.last_seen)), ...field("your impression", disc.impression),
    ]), h("button", { id: "peer-connect", type: "button", onclick: (e) => connect(e.target, disc.url) }, "Connect")]);
  }
}

function impressionForm(agentId, current) {
  const area = h("textarea", { id: "impression-text", rows: 2, placeholder: "Your impression of this agent (shared with your connections when they ask)" });
  area.value = current || "";
  return h("form", { class: "impression", onsubmit: (e) => {
    e.preventDefault();
    run(e.submitter, () => "Impression saved.", () => act("impression", { agent_id: agentId, impression: area.value }));
  } }, [area, h("button", { type: "submit" }, "Save impression")]);
}

function selectPeer(id) {
  selectedPeer = id === selectedPeer ? null : id;
  drawMesh($("graph"), state, selectedPeer, selectPeer);
  renderPeer();
}

function pendingButtons(r) {
  return h("span", { class: "actions" }, [
    h("button", { class: "accept", type: "button", onclick: (e) => run(e.target, (x) => x.status === "connected" ? `Connected to ${nameOf(x.agent_id)}.` : "Done.", () => act("accept", { request_id: r.request_id })) }, "Accept"),
    h("button", { class: "reject danger", type: "button", onclick: (e) => run(e.target, () => "Rejected.", () => act("reject", { request_id: r.request_id })) }, "Reject"),
  ]);
}

function renderPending() {
  const incoming = state.pending.incoming;
  $("pending-count").textContent = incoming.length ? String(incoming.length) : "";
  replace($("pending-list"), incoming.length ? incoming.map((r) => h("li", { class: "request", dataset: { requestId: r.request_id, agentId: r.from_agent_id } }, [
    h("div", {}, [h("strong", {}, r.display_name || shortId(r.from_agent_id)), " ", h("span", { class: "muted" }, `${r.url} · ${ago(r.requested_at)}`)]),
    r.bio ? h("div", { class: "muted small" }, clip(r.bio, 200)) : null,
    pendingButtons(r),
  ])) : h("li", { class: "empty muted" }, "No requests waiting."));
  replace($("outgoing-list"), state.pending.outgoing.map((p) => h("li", { class: "small" }, `Waiting for ${p.target} to accept (${ago(p.created_at)})`)));
}

function renderInbox() {
  const inbox = state.inbox;
  const unread = inbox.filter((m) => !m.read).length;
  $("inbox-count").textContent = inbox.length ? `${unread} unread / ${inbox.length}` : "";
  replace($("inbox-list"), inbox.length ? inbox.map((m) => h("li", {
    class: `message${m.read ? "" : " unread"}${fresh.has(m.message_id) ? " fresh" : ""}${openMessage === m.message_id ? " open" : ""}`,
    dataset: { messageId: m.message_id }, tabindex: 0, onclick: () => openInbox(m.message_id),
    onkeydown: (e) => { if (e.key === "Enter") openInbox(m.message_id); },
  }, [
    h("div", {}, [m.read ? null : h("span", { class: "badge" }, "new"), h("strong", {}, nameOf(m.from_agent_id)), " ",
      h("span", { class: "muted small" }, `${ago(m.received_at)} · ${m.hops_remaining} hops left${m.verified ? "" : " · unverified"}${m.forwarded_to.length ? ` · forwarded to ${m.forwarded_to.map(nameOf).join(", ")}` : ""}`)]),
    h("div", { class: "preview" }, clip(m.content, 240)),
  ])) : h("li", { class: "empty muted" }, "Inbox empty."));
  renderMessageDetail();
}

async function openInbox(id) {
  openMessage = id;
  openContent = null;
  fresh.delete(id);
  renderInbox();
  $("message-detail").scrollIntoView({ block: "nearest" });
  try {
    const full = await act("open", { message_id: id });
    if (openMessage === id) { openContent = full.content; renderMessageDetail(); }
  } catch (err) {
    notify(err.message, "error");
  }
}

function renderMessageDetail() {
  const box = $("message-detail");
  const m = openMessage && state.inbox.find((x) => x.message_id === openMessage);
  if (!m) { box.hidden = true; openMessage = null; return; }
  box.hidden = false;
  box.dataset.messageId = m.message_id;
  $("message-head").textContent = `From ${nameOf(m.from_agent_id)} (${shortId(m.from_agent_id)}) · ${m.message_id} · received ${ago(m.received_at)}`;
  $("message-body").textContent = openContent ?? m.content;
  const select = $("forward-to");
  const keep = select.value;
  replace(select, state.connections.filter((c) => c.agent_id !== m.from_agent_id)
    .map((c) => h("option", { value: c.agent_id }, `${nameOf(c.agent_id)} (${shortId(c.agent_id)})`)));
  if ([...select.options].some((o) => o.value === keep)) select.value = keep;
  $("forward-send").disabled = select.options.length === 0;
}

function routeSummary(m) {
  const d = Object.entries(m.deliveries);
  const states = d.map(([agent, x]) => `${nameOf(agent)}: ${x.state}`).join(", ");
  return `${m.status} · ${ago(m.created_at)}${states ? " · " + states : ""}`;
}

function renderSent() {
  const select = $("send-to");
  const keep = select.value;
  replace(select, [h("option", { value: "" }, "Everyone (broadcast)"),
    ...state.connections.map((c) => h("option", { value: c.agent_id }, `${nameOf(c.agent_id)} (${shortId(c.agent_id)})`))]);
  if ([...select.options].some((o) => o.value === keep)) select.value = keep;
  replace($("sent-list"), state.sent.length ? state.sent.map((m) => h("li", { class: `sent ${m.status}`, dataset: { messageId: m.message_id } }, [
    h("div", {}, [h("span", { class: `pill ${m.status}` }, m.status), " ", h("span", { class: "preview" }, clip(m.content, 200))]),
    h("div", { class: "muted small" }, routeSummary(m)),
    h("div", { class: "route-box" }, drawRoute(m, nameOf)),
    m.responses.length ? h("ul", { class: "responses" }, m.responses.map((r) => h("li", { class: "response" }, [
      h("strong", {}, nameOf(r.agent_id)), ` answered ${ago(r.timestamp)}${r.verified ? "" : " (unverified)"}: `,
      h("span", { class: "response-text" }, r.response)]))) : null,
  ])) : h("li", { class: "empty muted" }, "Nothing sent yet."));
}

function renderNode() {
  replace($("status-lines"), state.status.map((line) => h("li", { class: line.startsWith("ACTION:") ? "action" : "" }, line)));
  replace($("notices"), state.notices.length ? state.notices.slice().reverse().map((n) => h("li", {}, `${ago(n.at)}: ${n.text || n.type}`)) : h("li", {}, "none"));
  replace($("plugins"), state.plugins.length ? state.plugins.map((p) => h("li", {}, `${p.name} ${p.version || ""}`)) : h("li", { class: "muted" }, "built-ins only"));
  replace($("settings"), state.settings.map((x) => h("tr", {}, [h("th", {}, x.name), h("td", {}, x.value)])));
}

// --- actions from the forms ----------------------------------------------------------------------

function connect(button, url) {
  return run(button, (x) => x.status === "connected" ? `Connected to ${x.display_name || shortId(x.agent_id)}.`
    : x.status === "pending" ? "Request sent; the other node decides." : `Connection failed: ${x.error || x.status}`,
  () => act("connect", { url }));
}

function wire() {
  $("alert").addEventListener("click", acknowledge);
  $("connect-form").addEventListener("submit", async (e) => {
    e.preventDefault();
    if (await connect($("connect-button"), $("connect-url").value)) $("connect-url").value = "";
  });
  $("compose").addEventListener("submit", async (e) => {
    e.preventDefault();
    const to = $("send-to").value;
    const result = await run($("send-button"), (x) => {
      const d = Object.entries(x.deliveries || {}).map(([agent, y]) => `${nameOf(agent)}: ${y.state}`).join(", ");
      return `Sent ${x.message_id}${d ? " — " + d : ""}`;
    }, () => act("send", { content: $("send-text").value, to: to || null }));
    if (result && result.success) $("send-text").value = "";
  });
  $("respond-form").addEventListener("submit", async (e) => {
    e.preventDefault();
    const id = openMessage;
    const result = await run($("respond-send"), (x) => `Response ${x.delivery}.`, () => act("respond", { message_id: id, response: $("respond-text").value }));
    if (result && result.success) $("respond-text").value = "";
  });
  $("forward-form").addEventListener("submit", async (e) => {
    e.preventDefault();
    const result = await run($("forward-send"), (x) => `Forwarded to ${nameOf(x.target_agent_id)}: ${x.delivery}.`,
      () => act("forward", { message_id: openMessage, to: $("forward-to").value, note: $("forward-note").value || null }));
    if (result && result.success) $("forward-note").value = "";
  });
  document.addEventListener("visibilitychange", () => { if (!document.hidden && unseen && $("alert").hidden) { unseen = 0; document.title = baseTitle; } });
  setInterval(() => { if (state) render(state); }, 15000); // keep the "… ago" texts fresh
}

function live() {
  const badge = $("live");
  const source = new EventSource("/ui/api/events");
  source.addEventListener("open", () => { badge.textContent = "live"; badge.className = "live on"; });
  source.addEventListener("error", () => { badge.textContent = "reconnecting…"; badge.className = "live offline"; });
  source.addEventListener("state", (e) => render(JSON.parse(e.data)));
}

wire();
live();
