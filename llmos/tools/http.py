"""HTTP APIs as tools, one per OpenAPI operation.

`openapi_tools(spec, allowed_hosts=["api.example.com"], secrets={"EXAMPLE_KEY": "header:X-Api-Key"})`
reads an OpenAPI 3 document (a dict, a .json/.yaml file or a URL) and makes one tool per operation:
path, query and header parameters become arguments, a JSON request body becomes the `body`
argument. Each tool needs the capability `net:<host>`; GET/HEAD/OPTIONS are `Risk.NETWORK`,
every other method `Risk.WRITE`; what comes back is marked untrusted.

Secrets (API keys) never appear in a schema, so the model can neither see nor set them: the
kernel puts them in `ToolContext.secrets`, the tool adds them to the request at call time, and
their values are redacted from everything the model gets back (body, headers, error text).
Requests only go to `allowed_hosts`; redirects are not followed (a 3xx is reported), so an API
cannot bounce a request, and its key, to another host.
"""

from __future__ import annotations

import contextlib
import functools
import json
import re
import ssl
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote, urljoin, urlsplit

import httpx
from pydantic import BaseModel, model_validator

from llmos.kernel.devices import Risk, ToolContext, ToolResult
from llmos.tools.registry import Tool, safe_tool_name, simplify_schema

READ_METHODS = ("get", "head", "options")
METHODS = ("get", "put", "post", "delete", "patch", "head", "options", "trace")
REDACTED = "[redacted]"


class OpenApiError(ValueError):
    """The OpenAPI document or the options given with it cannot be used."""


class SecretPlacement(BaseModel):
    """Where a secret goes in each request: a header or a query parameter, with an optional prefix."""

    location: Literal["header", "query"]
    name: str
    prefix: str = ""  # e.g. "Bearer "

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        # "header:X-Api-Key", "query:api_key", "header:Authorization:Bearer "
        if isinstance(value, str):
            location, _, rest = value.partition(":")
            name, _, prefix = rest.partition(":")
            return {"location": location, "name": name, "prefix": prefix}
        return value


def openapi_tools(
    spec: Mapping[str, Any] | str | Path,
    *,
    allowed_hosts: Sequence[str],
    base_url: str | None = None,
    secrets: Mapping[str, SecretPlacement | str | Mapping[str, Any]] | None = None,
    operations: Iterable[str] | None = None,
    name_prefix: str = "",
    timeout_s: float = 30.0,
    max_response_chars: int = 20_000,
) -> list[Tool]:
    """One llmos tool per operation of an OpenAPI 3 document.

    allowed_hosts: hosts requests may go to (the spec URL and base_url must be among them).
    base_url: where the API lives; default: the document's first `servers` entry.
    secrets: {name in ToolContext.secrets: placement}, e.g. {"KEY": "header:X-Api-Key"}.
    operations: operationIds to keep (default: all).
    """
    allowed = {h.lower() for h in allowed_hosts}
    document, source_url = _load(spec, allowed)
    base = _base_url(document, base_url, source_url)
    host = _host(base)
    if host not in allowed:
        raise OpenApiError(f"The API host '{host}' is not in allowed_hosts {sorted(allowed)}; add it there.")
    placements = {key: SecretPlacement.model_validate(value) for key, value in (secrets or {}).items()}
    wanted = set(operations) if operations is not None else None
    tools = []
    for path, item in (document.get("paths") or {}).items():
        item = _resolve(document, item)
        for method in METHODS:
            if method not in item:
                continue
            operation = _resolve(document, item[method])
            op_id = operation.get("operationId") or f"{method}_{path}"
            if wanted is not None and op_id not in wanted:
                continue
            shared = [_resolve(document, p) for p in item.get("parameters", [])]
            endpoint = _Endpoint.build(document, op_id, method, path, operation, shared, placements)
            tools.append(
                HttpOperation(
                    endpoint,
                    name=name_prefix + safe_tool_name(op_id, fallback="operation"),
                    base_url=base,
                    allowed_hosts=allowed,
                    secrets=placements,
                    timeout_s=timeout_s,
                    max_response_chars=max_response_chars,
                )
            )
    if wanted is not None and (missing := wanted - {t.endpoint.operation_id for t in tools}):
        raise OpenApiError(
            f"The OpenAPI document has no operations {sorted(missing)}; check the operationIds."
        )
    return list(tools)


class _Endpoint(BaseModel):
    operation_id: str
    method: str
    path: str
    description: str
    schema_: dict[str, Any]
    locations: dict[str, Literal["path", "query", "header", "cookie"]]  # argument -> where it goes
    has_body: bool

    @classmethod
    def build(
        cls,
        document: Mapping[str, Any],
        operation_id: str,
        method: str,
        path: str,
        operation: Mapping[str, Any],
        shared: list[dict[str, Any]],
        secrets: Mapping[str, SecretPlacement],
    ) -> _Endpoint:
        hidden = {(p.location, p.name.lower()) for p in secrets.values()}
        params: dict[tuple[str, str], dict[str, Any]] = {}
        for raw in [*shared, *operation.get("parameters", [])]:  # operation-level ones win
            param = _resolve(document, raw)
            params[(param["in"], param["name"])] = param
        properties: dict[str, Any] = {}
        required: list[str] = []
        locations: dict[str, Any] = {}
        for (where, name), param in params.items():
            if (where, name.lower()) in hidden:
                continue  # a secret: filled in by the tool, never by the model
            prop = dict(_resolve(document, param.get("schema") or {"type": "string"}))
            if param.get("description"):
                prop["description"] = param["description"]
            properties[name] = prop
            locations[name] = where
            if param.get("required") or where == "path":
                required.append(name)
        body = _resolve(document, operation.get("requestBody") or {})
        media = (body.get("content") or {}).get("application/json")
        if media is not None:
            body_schema = dict(_resolve(document, media.get("schema") or {}))
            if body.get("description"):
                body_schema.setdefault("description", body["description"])
            properties["body"] = body_schema
            if body.get("required"):
                required.append("body")
        schema: dict[str, Any] = {"type": "object", "properties": properties, "additionalProperties": False}
        if required:
            schema["required"] = required
        text = [operation.get("summary", ""), operation.get("description", "")]
        description = "\n\n".join(t.strip() for t in text if t and t.strip()) or f"{method.upper()} {path}"
        return cls(
            operation_id=str(operation_id),
            method=method.upper(),
            path=path,
            description=description,
            schema_=simplify_schema(_openapi_to_json_schema(schema)),
            locations=locations,
            has_body=media is not None,
        )


class HttpOperation(Tool):
    """One API operation as a tool."""

    def __init__(
        self,
        endpoint: _Endpoint,
        *,
        name: str,
        base_url: str,
        allowed_hosts: set[str],
        secrets: Mapping[str, SecretPlacement],
        timeout_s: float,
        max_response_chars: int,
    ) -> None:
        super().__init__(
            name,
            endpoint.description,
            self._call,
            json_schema=endpoint.schema_,
            capability=f"net:{_host(base_url)}",
            risk=Risk.NETWORK if endpoint.method.lower() in READ_METHODS else Risk.WRITE,
            untrusted_output=True,
            secrets=secrets,
        )
        self.endpoint = endpoint
        self.base_url = base_url.rstrip("/") + "/"
        self.allowed_hosts = allowed_hosts
        self.secrets = dict(secrets)
        self.timeout_s = timeout_s
        self.max_response_chars = max_response_chars

    async def _call(self, arguments: dict[str, Any], ctx: ToolContext) -> ToolResult:
        values = {key: ctx.secrets[key] for key in self.secrets if ctx.secrets.get(key)}
        missing = [key for key in self.secrets if key not in values]
        if missing:
            return ToolResult.failure(
                f"Tool '{self.name}' cannot run: the secret {', '.join(missing)} is not configured "
                "for this process; ask the user to provide it."
            )
        redact = _Redact(values.values())
        try:
            request = self._request(arguments, values)
        except ValueError as exc:
            return ToolResult.failure(redact(str(exc)))
        host = _host(str(request.url))
        if host not in self.allowed_hosts:
            return ToolResult.failure(f"Requests to host '{host}' are not allowed for tool '{self.name}'.")
        try:
            # trust_env=False: no proxy from the environment gets to see the request (or its key)
            async with httpx.AsyncClient(
                timeout=self.timeout_s, follow_redirects=False, trust_env=False, verify=_tls_context()
            ) as c:
                response = await c.send(request, stream=True)
                try:
                    raw = await _read_capped(response, self.max_response_chars * 4)
                finally:
                    await response.aclose()
        except httpx.TimeoutException:
            return ToolResult.failure(
                f"{self._what()} timed out after {self.timeout_s:g} s; try again later."
            )
        except httpx.HTTPError as exc:
            return ToolResult.failure(redact(f"{self._what()} failed: {type(exc).__name__}: {exc}"))
        return self._result(response, raw, redact)

    def _what(self) -> str:
        return f"{self.endpoint.method} {self.endpoint.path}"

    def _request(self, arguments: Mapping[str, Any], secrets: Mapping[str, str]) -> httpx.Request:
        path = self.endpoint.path
        query: dict[str, Any] = {}
        headers: dict[str, str] = {"Accept": "application/json"}
        cookies: dict[str, str] = {}
        for name, value in arguments.items():
            where = self.endpoint.locations.get(name)
            if where == "path":
                # quote everything: a path argument must not add segments, a query or a host
                path = path.replace("{" + name + "}", quote(_scalar(value), safe=""))
            elif where == "query":
                query[name] = value if isinstance(value, list) else _scalar(value)
            elif where == "header":
                headers[name] = _scalar(value)
            elif where == "cookie":
                cookies[name] = _scalar(value)
        for key, placement in self.secrets.items():
            value = placement.prefix + secrets[key]
            if placement.location == "header":
                headers[placement.name] = value
            else:
                query[placement.name] = value
        url = urljoin(self.base_url, path.lstrip("/"))
        return httpx.Request(
            self.endpoint.method,
            url,
            params=query,
            headers=headers,
            cookies=cookies,
            json=arguments.get("body") if self.endpoint.has_body else None,
        )

    def _result(self, response: httpx.Response, raw: bytes, redact: _Redact) -> ToolResult:
        text = raw.decode(response.encoding or "utf-8", errors="replace")
        truncated = len(text) > self.max_response_chars or len(raw) >= self.max_response_chars * 4
        body: Any = text[: self.max_response_chars]
        if "json" in response.headers.get("content-type", "") and not truncated:
            with contextlib.suppress(json.JSONDecodeError):
                body = json.loads(text)
        body = _redact_json(body, redact)
        status = response.status_code
        if status >= 300:
            detail = body if isinstance(body, str) else json.dumps(body)
            if 300 <= status < 400:
                where = redact(response.headers.get("location", "?"))
                detail = f"the API redirected to {where}, which is not followed"
            return ToolResult(
                ok=False,
                error=f"HTTP {status} from {self._what()}: {detail[:500]}",
                untrusted=True,
            )
        content: dict[str, Any] = {"status": status, "body": body}
        if truncated:
            content["truncated"] = True
        return ToolResult(ok=True, content=content, untrusted=True)


# --- helpers -----------------------------------------------------------------------------------


@functools.cache
def _tls_context() -> ssl.SSLContext:
    """One TLS context for all calls: building it (loading the CA store) costs ~100 ms each time."""
    return ssl.create_default_context()


async def _read_capped(response: httpx.Response, limit: int) -> bytes:
    """At most `limit` bytes of the body: a huge or endless response must not fill the memory."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.aiter_bytes():
        chunks.append(chunk)
        size += len(chunk)
        if size >= limit:
            break
    return b"".join(chunks)[:limit]


def _load(spec: Mapping[str, Any] | str | Path, allowed: set[str]) -> tuple[dict[str, Any], str | None]:
    if isinstance(spec, Mapping):
        return dict(spec), None
    text_spec = str(spec)
    if re.match(r"https?://", text_spec):
        host = _host(text_spec)
        if host not in allowed:
            raise OpenApiError(
                f"Fetching the OpenAPI document from '{host}' is not allowed: add it to allowed_hosts."
            )
        try:
            response = httpx.get(text_spec, timeout=30, follow_redirects=False, trust_env=False)
            response.raise_for_status()
        except httpx.HTTPError as exc:
            raise OpenApiError(f"Could not fetch the OpenAPI document {text_spec}: {exc}.") from exc
        return _parse(response.text, text_spec), text_spec
    path = Path(spec)
    if not path.is_file():
        raise OpenApiError(f"The OpenAPI document {path} does not exist; pass a dict, a file or a URL.")
    return _parse(path.read_text(encoding="utf-8"), str(path)), None


def _parse(text: str, where: str) -> dict[str, Any]:
    try:
        document = json.loads(text)
    except json.JSONDecodeError:
        try:
            import yaml  # type: ignore[import-untyped]  # only for YAML documents
        except ImportError as exc:
            raise OpenApiError(
                f"{where} is not JSON; reading YAML needs PyYAML (pip install pyyaml)."
            ) from exc
        try:
            document = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise OpenApiError(f"{where} is neither valid JSON nor valid YAML: {exc}.") from exc
    if not isinstance(document, dict) or "paths" not in document:
        raise OpenApiError(f"{where} is not an OpenAPI document (no 'paths'); check the file or URL.")
    return document


def _base_url(document: Mapping[str, Any], base_url: str | None, source_url: str | None) -> str:
    if base_url is None:
        servers = document.get("servers") or []
        if not servers:
            raise OpenApiError("The OpenAPI document lists no servers: pass base_url=.")
        base_url = str(servers[0].get("url", ""))
        if source_url is not None:
            base_url = urljoin(source_url, base_url)
    if not re.match(r"https?://", base_url):
        raise OpenApiError(f"base_url {base_url!r} must be an absolute http(s) URL.")
    return base_url


def _host(url: str) -> str:
    return (urlsplit(url).hostname or "").lower()


def _resolve(document: Mapping[str, Any], node: Any, depth: int = 0) -> Any:
    """Inline local `$ref`s ("#/components/...") so each operation's schema stands alone."""
    if isinstance(node, list):
        return [_resolve(document, item, depth) for item in node]
    if not isinstance(node, dict):
        return node
    ref = node.get("$ref")
    if isinstance(ref, str):
        if not ref.startswith("#/") or depth > 16:
            raise OpenApiError(f"Cannot resolve $ref {ref!r}: only local, non-recursive refs are supported.")
        target: Any = document
        for part in ref[2:].split("/"):
            part = part.replace("~1", "/").replace("~0", "~")
            if not isinstance(target, dict) or part not in target:
                raise OpenApiError(f"The OpenAPI document has no {ref!r}.")
            target = target[part]
        return _resolve(document, target, depth + 1)
    return {key: _resolve(document, value, depth) for key, value in node.items()}


def _openapi_to_json_schema(node: Any) -> Any:
    """OpenAPI 3.0 schemas say `nullable: true`; JSON schema says `type: [..., "null"]`."""
    if isinstance(node, list):
        return [_openapi_to_json_schema(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {key: _openapi_to_json_schema(value) for key, value in node.items() if key != "nullable"}
    if node.get("nullable") is True and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
    for key in ("example", "xml", "externalDocs", "discriminator", "readOnly", "writeOnly"):
        out.pop(key, None)
    return out


def _scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict | list):
        return json.dumps(value)
    return str(value)


class _Redact:
    def __init__(self, secrets: Iterable[str]) -> None:
        # longest first, so a secret containing another is replaced whole; skip trivial values
        self.secrets = sorted({s for s in secrets if len(s) >= 4}, key=len, reverse=True)
        quoted = {quote(s, safe="") for s in self.secrets} | {quote(s) for s in self.secrets}
        self.secrets += sorted(quoted - set(self.secrets), key=len, reverse=True)

    def __call__(self, text: str) -> str:
        for secret in self.secrets:
            text = text.replace(secret, REDACTED)
        return text


def _redact_json(value: Any, redact: _Redact) -> Any:
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, list):
        return [_redact_json(v, redact) for v in value]
    if isinstance(value, dict):
        return {redact(str(k)): _redact_json(v, redact) for k, v in value.items()}
    return value
