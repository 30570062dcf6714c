"""HTTP conventions of docs/protocol.md §2 and the read-only endpoints of §4.8–§4.10, §8.3."""

import pytest

from darkmatter import api as actions
from darkmatter.testing import RawPeer, client, mesh, node_context

pytestmark = pytest.mark.anyio


async def test_routes_are_exact_and_errors_are_json(tmp_path):
    async with node_context(tmp_path) as node, client(node) as http:
        for path in ("/__darkmatter__/message/", "/mcp/", "/__darkmatter__/nope"):
            response = await http.post(path, json={})
            assert response.status_code == 404, path
            assert response.json()["code"] == "not_found"
        wrong_method = await http.get("/__darkmatter__/message")
        assert wrong_method.status_code == 405 and wrong_method.json()["code"] == "method_not_allowed"


async def test_browser_origin_and_foreign_host_are_refused_on_mesh_routes(tmp_path):
    async with node_context(tmp_path) as node, client(node) as http:
        response = await http.get("/__darkmatter__/status", headers={"Origin": "http://evil.example"})
        assert response.status_code == 403 and response.json()["code"] == "forbidden"
        response = await http.get("/__darkmatter__/status", headers={"Host": "evil.example"})
        assert response.status_code == 421 and response.json()["code"] == "misdirected"
        for host in (f"localhost:{node.port}", f"127.0.0.5:{node.port}", f"[::1]:{node.port}"):
            assert (await http.get("/__darkmatter__/status", headers={"Host": host})).status_code == 200


async def test_malformed_bodies_get_400_or_413_and_change_nothing(tmp_path):
    async with node_context(tmp_path) as node, client(node) as http:
        peer = RawPeer()
        await peer.connect(node)
        bodies = {
            b"not json": 400, b"[1, 2]": 400, b'{"a": NaN}': 400, b'{"a": "\\ud800"}': 400, b"\xff\xfe": 400,
            b"[" * 100000: 400, b'{"message_id": 5}': 400,
        }
        for raw, status in bodies.items():
            response = await http.post("/__darkmatter__/message", content=raw)
            assert response.status_code == status, raw[:20]
            assert "error" in response.json()
        big = peer.message(node, "x" * 70000)
        assert (await http.post("/__darkmatter__/message", json=big)).status_code == 413
        huge = b'{"pad": "' + b"x" * (1024 * 1024 + 10) + b'"}'
        assert (await http.post("/__darkmatter__/message", content=huge)).status_code == 413
        wrong_type = peer.message(node, "ok")
        wrong_type["hops_remaining"] = True  # a boolean is never an integer
        assert (await http.post("/__darkmatter__/message", json=wrong_type)).status_code == 400
        assert not node.state["inbox"]


async def test_status_network_info_lookup_and_well_known(tmp_path):
    async with mesh(tmp_path, 2) as (a, b), client(a) as http:
        status = (await http.get("/__darkmatter__/status")).json()
        assert status["agent_id"] == a.agent_id and status["num_connections"] == 1
        assert status["protocol_version"] == "0.3" and status["accepting_connections"] is True
        info = (await http.get("/__darkmatter__/network_info")).json()
        assert [p["agent_id"] for p in info["peers"]] == [b.agent_id]  # loopback callers see peers
        known = (await http.get(f"/__darkmatter__/peer_lookup/{b.agent_id}")).json()
        assert known == {"agent_id": b.agent_id, "url": b.base_url, "status": "connected"}
        unknown = await http.get("/__darkmatter__/peer_lookup/nobody")
        assert unknown.status_code == 404
        doc = (await http.get("/.well-known/darkmatter.json")).json()
        assert doc["darkmatter"] is True and doc["agent_id"] == a.agent_id
        assert doc["mesh_url"] == f"http://127.0.0.1:{a.port}/__darkmatter__"
        assert doc["mcp_url"] == f"http://127.0.0.1:{a.port}/mcp"
        assert {"name": "http_transport", "version": "0.3.0"} in doc["plugins"]


async def test_impressions_are_shared_only_with_signed_requests_from_connections(tmp_path):
    async with mesh(tmp_path, 2) as (a, b):
        a.state["impressions"]["someone"] = "reliable reviewer"
        shared = await actions.ask_impression(b, a.agent_id, "someone")
        assert shared["has_impression"] is True and shared["impression"] == "reliable reviewer"
        async with client(a) as http:
            unsigned = await http.get("/__darkmatter__/impression/someone")
        assert unsigned.status_code == 403 and unsigned.json()["code"] == "signature_required"


async def test_per_peer_message_rate_limit_answers_429_with_retry_after(tmp_path):
    async with node_context(tmp_path, DARKMATTER_RATE_MESSAGE_PEER="2/1/60") as node:
        peer = RawPeer()
        await peer.connect(node)
        statuses = [(await peer.post(node, "/__darkmatter__/message", peer.message(node, f"m{i}"))) for i in range(3)]
        assert [r.status_code for r in statuses] == [200, 200, 429]
        assert statuses[2].json()["code"] == "rate_limited" and int(statuses[2].headers["Retry-After"]) >= 1
        assert len(node.state["inbox"]) == 2
