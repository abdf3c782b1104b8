"""OpenAPI tools against a real HTTP API on 127.0.0.1 (stdlib http.server in a thread)."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from llmos import Kernel
from llmos.config import load_config
from llmos.kernel.process import Process, detached
from llmos.tools import Risk, Tool, ToolContext
from llmos.tools.http import OpenApiError, openapi_tools

API_KEY = "sk-test-4f9a1c77e2"

SPEC: dict[str, Any] = {
    "openapi": "3.0.3",
    "info": {"title": "Pets", "version": "1"},
    "paths": {
        "/pets": {
            "get": {
                "operationId": "listPets",
                "summary": "List pets.",
                "parameters": [
                    {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1}},
                    {"name": "X-Api-Key", "in": "header", "required": True, "schema": {"type": "string"}},
                ],
            },
            "post": {
                "operationId": "createPet",
                "summary": "Add a pet.",
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/NewPet"}}},
                },
            },
        },
        "/pets/{petId}": {
            "parameters": [{"name": "petId", "in": "path", "required": True, "schema": {"type": "string"}}],
            "get": {"operationId": "getPet", "description": "One pet by id."},
            "delete": {"operationId": "deletePet"},
        },
        "/echo": {"get": {"operationId": "echoHeaders", "summary": "What the server received."}},
        "/moved": {"get": {"operationId": "moved"}},
        "/big": {"get": {"operationId": "big"}},
    },
    "components": {
        "schemas": {
            "NewPet": {
                "type": "object",
                "properties": {"name": {"type": "string"}, "tag": {"type": "string", "nullable": True}},
                "required": ["name"],
            }
        }
    },
}


class PetApi(BaseHTTPRequestHandler):
    received: list[dict[str, Any]]  # set on the subclass the fixture makes
    pets: dict[str, dict[str, Any]]

    def log_message(self, format: str, *args: Any) -> None:  # keep test output quiet
        return

    def _send(self, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(data)

    def _record(self, body: Any = None) -> tuple[str, dict[str, list[str]]]:
        url = urlsplit(self.path)
        query = parse_qs(url.query)
        self.received.append(
            {
                "method": self.command,
                "path": url.path,
                "query": query,
                "headers": dict(self.headers),
                "body": body,
            }
        )
        return url.path, query

    def do_GET(self) -> None:
        path, query = self._record()
        if path == "/openapi.json":
            self._send(200, {**SPEC, "servers": [{"url": "/"}]})
        elif path == "/pets":
            if self.headers.get("X-Api-Key") != API_KEY:
                self._send(401, {"error": f"bad key {self.headers.get('X-Api-Key')}"})
                return
            limit = int(query.get("limit", ["10"])[0])
            self._send(200, list(self.pets.values())[:limit])
        elif path.startswith("/pets/"):
            pet = self.pets.get(path.removeprefix("/pets/"))
            self._send(200, pet) if pet else self._send(404, {"error": "no such pet"})
        elif path == "/echo":
            self._send(200, {"headers": dict(self.headers), "query": query})
        elif path == "/big":
            self._send(200, ["x" * 1000] * 2000)  # about 2 MB
        elif path == "/moved":
            self._send(302, {}, {"Location": "http://127.0.0.2:9/steal"})
        else:
            self._send(404, {"error": "not found"})

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", "0"))))
        self._record(body)
        pet_id = str(len(self.pets) + 1)
        self.pets[pet_id] = {"id": pet_id, **body}
        self._send(201, self.pets[pet_id])

    def do_DELETE(self) -> None:
        path, _ = self._record()
        self.pets.pop(path.removeprefix("/pets/"), None)
        self._send(200, {"deleted": True})


@pytest.fixture(scope="module")
def api() -> Iterator[tuple[str, list[dict[str, Any]]]]:
    received: list[dict[str, Any]] = []
    handler = type("Handler", (PetApi,), {"received": received, "pets": {"1": {"id": "1", "name": "Rex"}}})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", received
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@pytest.fixture
def tools(api: tuple[str, list[dict[str, Any]]]) -> dict[str, Tool]:
    base, _ = api
    made = openapi_tools(
        SPEC, base_url=base, allowed_hosts=["127.0.0.1"], secrets={"PETS_KEY": "header:X-Api-Key"}
    )
    return {t.name: t for t in made}


@pytest.fixture
def secret_ctx(ctx: ToolContext) -> ToolContext:
    return ToolContext(process=detached(ctx.pid), workspace=ctx.workspace, secrets={"PETS_KEY": API_KEY})


def test_one_tool_per_operation_with_schemas(tools: dict[str, Tool]) -> None:
    assert set(tools) == {"listPets", "createPet", "getPet", "deletePet", "echoHeaders", "moved", "big"}
    list_pets = tools["listPets"].spec()
    assert list_pets.description == "List pets."
    # the API key is a secret: not an argument the model sees or sets
    assert list_pets.parameters["properties"] == {"limit": {"type": "integer", "minimum": 1}}
    assert API_KEY not in json.dumps([t.spec().model_dump() for t in tools.values()])
    create = tools["createPet"].spec().parameters
    assert create["required"] == ["body"]
    assert create["properties"]["body"]["properties"]["tag"]["type"] == ["string", "null"]
    assert tools["getPet"].spec().parameters["required"] == ["petId"]
    assert tools["getPet"].spec().description == "One pet by id."


def test_capabilities_and_risks(tools: dict[str, Tool]) -> None:
    assert {t.capability for t in tools.values()} == {"net:127.0.0.1"}
    assert tools["listPets"].risk is Risk.NETWORK
    assert tools["createPet"].risk is Risk.WRITE
    assert tools["deletePet"].risk is Risk.WRITE
    assert all(t.untrusted_output for t in tools.values())
    # the kernel can hand each tool only the secrets it names
    assert all(t.secret_names == {"PETS_KEY"} for t in tools.values())


async def test_a_call_with_the_secret_arriving_at_the_server_only(
    tools: dict[str, Tool], secret_ctx: ToolContext, api: tuple[str, list[dict[str, Any]]]
) -> None:
    _, received = api
    result = await tools["listPets"].invoke({"limit": 1}, secret_ctx)
    assert result.ok, result.error
    assert result.untrusted
    assert result.content == {"status": 200, "body": [{"id": "1", "name": "Rex"}]}
    request = received[-1]
    assert request["path"] == "/pets" and request["query"] == {"limit": ["1"]}
    assert request["headers"]["X-Api-Key"] == API_KEY
    assert API_KEY not in result.model_dump_json()


async def test_a_secret_echoed_by_the_api_is_redacted(
    tools: dict[str, Tool], secret_ctx: ToolContext
) -> None:
    result = await tools["echoHeaders"].invoke({}, secret_ctx)
    assert result.ok
    assert result.content["body"]["headers"]["X-Api-Key"] == "[redacted]"
    assert API_KEY not in result.model_dump_json()


async def test_secret_in_the_query_and_in_error_text_is_redacted(
    api: tuple[str, list[dict[str, Any]]], secret_ctx: ToolContext
) -> None:
    base, received = api
    (echo,) = openapi_tools(
        SPEC,
        base_url=base,
        allowed_hosts=["127.0.0.1"],
        secrets={"PETS_KEY": "query:api_key"},
        operations=["echoHeaders"],
    )
    result = await echo.invoke({}, secret_ctx)
    assert received[-1]["query"] == {"api_key": [API_KEY]}
    assert result.content["body"]["query"] == {"api_key": ["[redacted]"]}
    # the server answers 401 and quotes the key it got: the model sees the error without it
    (list_pets,) = openapi_tools(
        SPEC,
        base_url=base,
        allowed_hosts=["127.0.0.1"],
        secrets={"PETS_KEY": "header:X-Api-Key:Bearer "},
        operations=["listPets"],
    )
    refused = await list_pets.invoke({}, secret_ctx)
    assert not refused.ok and refused.error is not None
    assert refused.error.startswith("HTTP 401 from GET /pets")
    assert "Bearer [redacted]" in refused.error and API_KEY not in refused.error


async def test_missing_secret_is_reported_not_sent(tools: dict[str, Tool], ctx: ToolContext) -> None:
    result = await tools["listPets"].invoke({}, ctx)
    assert not result.ok and "PETS_KEY is not configured" in (result.error or "")


async def test_body_path_and_methods(tools: dict[str, Tool], secret_ctx: ToolContext) -> None:
    created = await tools["createPet"].invoke({"body": {"name": "Tom", "tag": None}}, secret_ctx)
    assert created.ok and created.content["status"] == 201
    pet_id = created.content["body"]["id"]
    fetched = await tools["getPet"].invoke({"petId": pet_id}, secret_ctx)
    assert fetched.content["body"]["name"] == "Tom"
    assert (await tools["deletePet"].invoke({"petId": pet_id}, secret_ctx)).ok
    gone = await tools["getPet"].invoke({"petId": pet_id}, secret_ctx)
    assert not gone.ok and gone.error == 'HTTP 404 from GET /pets/{petId}: {"error": "no such pet"}'


async def test_path_arguments_cannot_change_the_path_or_host(
    tools: dict[str, Tool], secret_ctx: ToolContext, api: tuple[str, list[dict[str, Any]]]
) -> None:
    _, received = api
    result = await tools["getPet"].invoke({"petId": "../echo?x=//evil.example/"}, secret_ctx)
    assert not result.ok  # 404: the whole value stayed one path segment
    assert received[-1]["path"].startswith("/pets/..%2Fecho%3Fx%3D%2F%2Fevil.example%2F")


async def test_bad_arguments_are_refused_before_any_request(
    tools: dict[str, Tool], secret_ctx: ToolContext, api: tuple[str, list[dict[str, Any]]]
) -> None:
    _, received = api
    before = len(received)
    for arguments in ({"limit": 0}, {"limit": "many"}, {"X-Api-Key": "mine"}, {"other": 1}):
        result = await tools["listPets"].invoke(arguments, secret_ctx)
        assert not result.ok and (result.error or "").startswith("Invalid arguments")
    missing_body = await tools["createPet"].invoke({}, secret_ctx)
    assert "'body' is a required property" in (missing_body.error or "")
    assert len(received) == before


async def test_redirects_are_not_followed(tools: dict[str, Tool], secret_ctx: ToolContext) -> None:
    result = await tools["moved"].invoke({}, secret_ctx)
    assert not result.ok
    assert "HTTP 302" in (result.error or "") and "not followed" in (result.error or "")


def test_a_host_outside_allowed_hosts_is_refused(api: tuple[str, list[dict[str, Any]]]) -> None:
    base, _ = api
    with pytest.raises(OpenApiError, match="not in allowed_hosts"):
        openapi_tools(SPEC, base_url=base, allowed_hosts=["api.example.com"])
    with pytest.raises(OpenApiError, match="not allowed"):
        openapi_tools(f"{base}/openapi.json", allowed_hosts=["api.example.com"])


async def test_a_disallowed_host_is_refused_at_call_time(
    api: tuple[str, list[dict[str, Any]]], secret_ctx: ToolContext
) -> None:
    base, received = api
    (get_pet,) = openapi_tools(SPEC, base_url=base, allowed_hosts=["127.0.0.1"], operations=["getPet"])
    get_pet.base_url = base.replace("127.0.0.1", "localhost") + "/"  # e.g. a tampered tool
    before = len(received)
    result = await get_pet.invoke({"petId": "1"}, secret_ctx)
    assert result.error == "Requests to host 'localhost' are not allowed for tool 'getPet'."
    assert len(received) == before


async def test_spec_from_a_url_and_from_a_file(
    api: tuple[str, list[dict[str, Any]]], tmp_path: Path, secret_ctx: ToolContext
) -> None:
    base, _ = api
    from_url = {t.name: t for t in openapi_tools(f"{base}/openapi.json", allowed_hosts=["127.0.0.1"])}
    assert (await from_url["getPet"].invoke({"petId": "1"}, secret_ctx)).content["body"]["name"] == "Rex"
    path = tmp_path / "pets.json"
    path.write_text(json.dumps(SPEC))
    from_file = openapi_tools(path, base_url=base, allowed_hosts=["127.0.0.1"], name_prefix="pets_")
    assert "pets_getPet" in {t.name for t in from_file}


async def test_an_api_that_is_down_is_an_error_result(secret_ctx: ToolContext) -> None:
    (get_pet,) = openapi_tools(
        SPEC, base_url="http://127.0.0.1:9", allowed_hosts=["127.0.0.1"], operations=["getPet"]
    )
    result = await get_pet.invoke({"petId": "1"}, secret_ctx)
    assert not result.ok and "GET /pets/{petId} failed: ConnectError" in (result.error or "")


def test_bad_documents_and_options_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(OpenApiError, match="does not exist"):
        openapi_tools(tmp_path / "missing.json", allowed_hosts=["127.0.0.1"])
    (tmp_path / "x.json").write_text('{"hello": 1}')
    with pytest.raises(OpenApiError, match="not an OpenAPI document"):
        openapi_tools(tmp_path / "x.json", allowed_hosts=["127.0.0.1"])
    with pytest.raises(OpenApiError, match="lists no servers"):
        openapi_tools(SPEC, allowed_hosts=["127.0.0.1"])
    with pytest.raises(OpenApiError, match="no operations"):
        openapi_tools(SPEC, base_url="http://127.0.0.1:1", allowed_hosts=["127.0.0.1"], operations=["nope"])


async def list_pets(proc: Process) -> Any:
    reply = await proc.syscall("tool.call", name="echoHeaders", arguments={})
    return reply.unwrap()


async def test_the_kernel_injects_secrets_and_the_journal_never_holds_them(
    tools: dict[str, Tool], tmp_path: Path, api: tuple[str, list[dict[str, Any]]]
) -> None:
    _, received = api
    config = load_config(env={"LLMOS_HOME": str(tmp_path / "home")})
    async with Kernel(config, secrets={"PETS_KEY": API_KEY}) as kernel:
        kernel.tools.register(*tools.values())
        pid = await kernel.spawn(list_pets, capabilities=["net:127.0.0.1"])
        info = await kernel.wait(pid, timeout_s=60)
        assert info.error is None, info.error
        assert info.result["ok"] and info.result["content"]["body"]["headers"]["X-Api-Key"] == "[redacted]"
        assert received[-1]["headers"]["X-Api-Key"] == API_KEY
        denied = await kernel.spawn(list_pets, capabilities=["net:api.example.com"])
        assert "lacks the capability 'net:127.0.0.1'" in (
            (await kernel.wait(denied, timeout_s=60)).error or ""
        )
    stored = b"".join(p.read_bytes() for p in (tmp_path / "home").rglob("*") if p.is_file())
    assert API_KEY.encode() not in stored


async def test_a_huge_response_is_truncated(api: tuple[str, list[dict[str, Any]]], ctx: ToolContext) -> None:
    base, _ = api
    (big,) = openapi_tools(
        SPEC, base_url=base, allowed_hosts=["127.0.0.1"], operations=["big"], max_response_chars=1000
    )
    result = await big.invoke({}, ctx)
    assert result.ok and result.content["truncated"] is True
    assert isinstance(result.content["body"], str) and len(result.content["body"]) == 1000


async def read_then_delete(proc: Process) -> Any:
    """A compromised model: it reads the API (untrusted data), then deletes what it was told to."""
    (await proc.syscall("tool.call", name="listPets", arguments={})).unwrap()
    reply = await proc.syscall("tool.call", name="deletePet", arguments={"petId": "1"})
    return reply.value.ok if reply.ok else reply.error.code  # type: ignore[union-attr]


async def test_after_reading_an_api_a_delete_on_it_waits_for_a_person(
    tools: dict[str, Tool], tmp_path: Path, api: tuple[str, list[dict[str, Any]]]
) -> None:
    _, received = api
    before = len(received)  # the server is shared with the other tests of this module
    config = load_config(env={"LLMOS_HOME": str(tmp_path / "home")})
    async with Kernel(config, secrets={"PETS_KEY": API_KEY}) as kernel:
        kernel.tools.register(*tools.values())
        pid = await kernel.spawn(read_then_delete)
        for _ in range(1000):
            pending = kernel.approvals.pending(pid)
            if pending:
                break
            await asyncio.sleep(0.01)
        (approval,) = pending
        assert approval.tool == "deletePet" and approval.risk == "write" and "untrusted" in approval.reason
        assert not any(r["method"] == "DELETE" for r in received[before:])  # nothing sent before the answer
        kernel.approve(approval.key, approve=False)
        assert (await kernel.wait(pid, timeout_s=60)).result == "denied"
    assert [r["method"] for r in received[before:]] == ["GET"]
