// A scripted MCP session with the official TypeScript SDK client (@modelcontextprotocol/sdk),
// driven by tests/test_mcp_js.py.
//
//   node client.mjs '{"transport": "stdio", "command": "...", "args": [...], "env": {...}}'
//   node client.mjs '{"transport": "http", "url": "http://127.0.0.1:PORT/mcp"}'
//
// Prints JSON lines on stdout: {"phase": "ready", ...} once connected and checked; then it waits (at most
// `waitMs`) for a notifications/tools/list_changed, which the test causes by sending a mesh message to the
// node, and prints {"phase": "done", ...}.
import { Client } from "@modelcontextprotocol/sdk/client/index.js";
import { StdioClientTransport } from "@modelcontextprotocol/sdk/client/stdio.js";
import { StreamableHTTPClientTransport } from "@modelcontextprotocol/sdk/client/streamableHttp.js";
import { ToolListChangedNotificationSchema } from "@modelcontextprotocol/sdk/types.js";

const spec = JSON.parse(process.argv[2]);
const emit = (obj) => process.stdout.write(JSON.stringify(obj) + "\n");

const client = new Client({ name: "darkmatter-ts-test", version: "1.0.0" });
let changedAt = null;
let onChange = () => {};
client.setNotificationHandler(ToolListChangedNotificationSchema, async () => {
  if (changedAt === null) changedAt = Date.now();
  onChange();
});

const transport =
  spec.transport === "stdio"
    ? new StdioClientTransport({ command: spec.command, args: spec.args, env: spec.env, stderr: "inherit" })
    : new StreamableHTTPClientTransport(new URL(spec.url));

const text = (result) => (result.content && result.content[0] ? result.content[0].text : "");

try {
  await client.connect(transport);
  const { tools } = await client.listTools();
  const badEnum = await client.callTool({ name: "darkmatter_set_status", arguments: { status: "asleep" } });
  const wrongKey = await client.callTool({
    name: "darkmatter_authenticate",
    arguments: { private_key_hex: "ab".repeat(32) },
  });
  const identity = await client.callTool({ name: "darkmatter_get_identity", arguments: {} });
  emit({
    phase: "ready",
    protocolVersion: transport.protocolVersion ?? null,
    listChanged: client.getServerCapabilities()?.tools?.listChanged ?? null,
    tools: tools.map((t) => ({ name: t.name, schemaType: t.inputSchema?.type, annotations: t.annotations })),
    badEnum: { isError: badEnum.isError === true, text: text(badEnum) },
    wrongKey: { isError: wrongKey.isError === true, text: text(wrongKey) },
    identity: identity.structuredContent,
  });
  changedAt = null; // from here on, only changes the test causes count
  const started = Date.now();
  await new Promise((resolve) => {
    if (changedAt !== null) return resolve();
    onChange = resolve;
    setTimeout(resolve, spec.waitMs ?? 5000).unref();
  });
  const after = await client.listTools();
  const status = after.tools.find((t) => t.name === "darkmatter_status");
  emit({
    phase: "done",
    listChangedAfterMs: changedAt === null ? null : Math.max(0, changedAt - started),
    statusDescription: status ? status.description : null,
  });
} catch (err) {
  emit({ phase: "error", message: String(err && err.stack ? err.stack : err) });
  process.exitCode = 1;
} finally {
  await client.close().catch(() => {});
}
