"""Tools: what a process may call, described to the model as a JSON schema.

A `Tool` turns a model's tool call (a JSON object, or JSON text that may be broken) into a
`ToolResult`. It never raises for a mistake the model made: invalid JSON, a missing, extra or
wrong-typed argument, or an exception inside the tool all come back as `ToolResult(ok=False)`
with one sentence the model can act on. Arguments are checked against a pydantic model
(tools written in Python, via `@tool`) or against a raw JSON schema (tools that come from
elsewhere: MCP servers, OpenAPI operations).
"""

from __future__ import annotations

import asyncio
import inspect
import json
import re
import types
import typing
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from typing import Any, overload

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model
from pydantic_core import to_jsonable_python

from llmos.kernel.devices import Risk, ToolContext, ToolResult, ToolSpec, UnknownTool


class ToolError(Exception):
    """Raise inside a tool to send the model this exact message (no exception type prefix)."""


Handler = Callable[[dict[str, Any], ToolContext], Awaitable[Any]]


class Tool:
    """A callable the model can use.

    `handler(arguments, ctx)` receives the validated arguments as a dict (nested pydantic
    models stay models when the tool has an `args_model`) and returns any JSON-able value,
    a pydantic model, or a ready `ToolResult`.
    """

    def __init__(
        self,
        name: str,
        description: str,
        handler: Handler,
        *,
        args_model: type[BaseModel] | None = None,
        json_schema: dict[str, Any] | None = None,
        capability: str | None = None,
        risk: Risk = Risk.READ,
        untrusted_output: bool = False,
        secrets: Iterable[str] = (),
        uses: Iterable[str] = (),
    ) -> None:
        if (args_model is None) == (json_schema is None):
            raise TypeError(f"Tool '{name}' needs exactly one of args_model or json_schema.")
        if not re.fullmatch(r"[A-Za-z0-9_.\-]{1,128}", name):
            raise ValueError(
                f"Tool name {name!r} is not allowed: use 1-128 letters, digits, '_', '-' or '.'."
            )
        self.name = name
        self.description = description
        self.handler = handler
        self.args_model = args_model
        self.capability = capability or f"tool:{name}"
        self.risk = Risk(risk)
        self.untrusted_output = untrusted_output
        # the names of the secrets this tool needs: the kernel should pass it only these
        self.secret_names = frozenset(secrets)
        # capabilities of the syscalls the tool makes itself: a caller of the tool may use them through it
        self.uses = frozenset(uses)
        self._json_schema = json_schema
        self._validator: Any = None

    def __repr__(self) -> str:
        return f"<Tool {self.name} risk={self.risk.value} capability={self.capability}>"

    @property
    def parameters(self) -> dict[str, Any]:
        """The JSON schema of the arguments, as sent to the model."""
        if self._json_schema is None:
            assert self.args_model is not None
            self._json_schema = model_schema(self.args_model)  # generated once: it is not cheap
        return self._json_schema

    def spec(self) -> ToolSpec:
        return ToolSpec(name=self.name, description=self.description, parameters=self.parameters)

    async def invoke(self, arguments: dict[str, Any] | str, ctx: ToolContext) -> ToolResult:
        parsed = parse_arguments(arguments, self.parameters)
        if isinstance(parsed, str):
            return self._fail(parsed)
        try:
            checked = self._validate(parsed)
        except Exception as exc:  # a validator that crashes, or a schema that cannot be compiled
            checked = f"The arguments could not be checked ({type(exc).__name__}: {exc})."
        if isinstance(checked, str):
            return self._fail(checked)
        try:
            value = await self.handler(checked, ctx)
        except ToolError as exc:
            return self._fail(str(exc))
        except Exception as exc:  # a crash inside the tool is news for the model, not for the kernel
            return self._fail(f"tool '{self.name}' failed: {type(exc).__name__}: {exc}")
        if isinstance(value, ToolResult):
            if self.untrusted_output and not value.untrusted:
                value = value.model_copy(update={"untrusted": True})
            return value
        try:
            content = jsonable(value)
        except Exception as exc:
            return self._fail(f"tool '{self.name}' returned a value that is not JSON-able: {exc}")
        return ToolResult(ok=True, content=content, untrusted=self.untrusted_output)

    def _fail(self, error: str) -> ToolResult:
        return ToolResult(ok=False, error=error, untrusted=self.untrusted_output)

    def _validate(self, arguments: dict[str, Any]) -> dict[str, Any] | str:
        """The checked arguments, or one sentence saying what is wrong with them."""
        if self.args_model is not None:
            try:
                model = self.args_model.model_validate(arguments)
            except ValidationError as exc:
                return explain_validation_error(exc, self.parameters)
            return {key: getattr(model, key) for key in type(model).model_fields}
        return self._validate_schema(arguments, self.parameters)

    def _validate_schema(self, arguments: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any] | str:
        # only tools described by a raw schema (MCP, OpenAPI, LangChain) need jsonschema
        import jsonschema  # type: ignore[import-untyped]

        if self._validator is None:
            self._validator = jsonschema.validators.validator_for(schema)(schema)
        error = jsonschema.exceptions.best_match(self._validator.iter_errors(arguments))
        if error is None:
            return arguments
        where = _location(list(error.absolute_path))
        return f"Invalid arguments: {where}{error.message}.{_argument_hint(self.parameters)}"


class FunctionTool(Tool):
    """A tool made by `@tool` from a Python function; calling it calls the function."""

    def __init__(self, fn: Callable[..., Any], **kwargs: Any) -> None:
        super().__init__(handler=self._call, **kwargs)
        self.fn = fn
        self._context_params = _context_params(fn)
        self.__doc__ = fn.__doc__
        self.__wrapped__ = fn

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)

    async def _call(self, arguments: dict[str, Any], ctx: ToolContext) -> Any:
        kwargs = dict(arguments)
        for param in self._context_params:
            kwargs[param] = ctx
        if inspect.iscoroutinefunction(self.fn):
            return await self.fn(**kwargs)
        # A blocking function must not stall the kernel's event loop.
        result = await asyncio.to_thread(self.fn, **kwargs)
        if inspect.isawaitable(result):
            result = await result
        return result


@overload
def tool(fn: Callable[..., Any], /) -> FunctionTool: ...


@overload
def tool(
    fn: None = None,
    /,
    *,
    name: str | None = None,
    description: str | None = None,
    capability: str | None = None,
    risk: Risk = Risk.READ,
    untrusted_output: bool = False,
    secrets: Iterable[str] = (),
    uses: Iterable[str] = (),
) -> Callable[[Callable[..., Any]], FunctionTool]: ...


def tool(
    fn: Callable[..., Any] | None = None,
    /,
    *,
    name: str | None = None,
    description: str | None = None,
    capability: str | None = None,
    risk: Risk = Risk.READ,
    untrusted_output: bool = False,
    secrets: Iterable[str] = (),
    uses: Iterable[str] = (),
) -> FunctionTool | Callable[[Callable[..., Any]], FunctionTool]:
    """Make a tool from a typed function (sync or async); use as `@tool` or `@tool(risk=...)`.

    The argument schema comes from the type hints, and each argument's description from the
    docstring's `Args:` (Google) or `Parameters` (numpy) section. A parameter annotated
    `ToolContext` receives the call's context and is not shown to the model; `secrets` names
    the entries of `ToolContext.secrets` the tool reads (API keys), which never enter a schema;
    `uses` the capabilities of the syscalls it makes itself through `ctx.process` ("sandbox").
    """

    def make(fn: Callable[..., Any]) -> FunctionTool:
        summary, arg_docs = parse_docstring(inspect.getdoc(fn) or "")
        tool_name = name or fn.__name__
        return FunctionTool(
            fn,
            name=tool_name,
            description=description if description is not None else summary,
            args_model=args_model_for(fn, arg_docs, model_name=_camel(tool_name) + "Args"),
            capability=capability,
            risk=risk,
            untrusted_output=untrusted_output,
            secrets=secrets,
            uses=uses,
        )

    return make if fn is None else make(fn)


class ToolRegistry:
    """The tools a kernel offers, by name. Each kernel owns its own (no global registry)."""

    def __init__(self, tools: Iterable[Tool] = ()) -> None:
        self._tools: dict[str, Tool] = {}
        self.register(*tools)

    def register(self, *tools: Tool) -> None:
        for t in tools:
            if self._tools.get(t.name) is t:
                continue  # the same tool again: the built-in ones are on every booted kernel
            if t.name in self._tools:
                raise ValueError(
                    f"A tool named '{t.name}' is already registered: unregister it first or rename one."
                )
            self._tools[t.name] = t

    def unregister(self, name: str) -> None:
        if name not in self._tools:
            raise UnknownTool(name, self._tools)
        del self._tools[name]

    def get(self, name: str) -> Tool:
        try:
            return self._tools[name]
        except KeyError:
            raise UnknownTool(name, self._tools) from None

    def names(self) -> list[str]:
        return list(self._tools)

    def specs(self, names: Iterable[str] | None = None) -> list[ToolSpec]:
        chosen = self._tools.values() if names is None else [self.get(n) for n in names]
        return [t.spec() for t in chosen]

    def __contains__(self, name: object) -> bool:
        return name in self._tools

    def __iter__(self) -> Iterator[Tool]:
        return iter(list(self._tools.values()))

    def __len__(self) -> int:
        return len(self._tools)


# --- arguments ---------------------------------------------------------------------------------


def parse_arguments(arguments: dict[str, Any] | str, schema: Mapping[str, Any]) -> dict[str, Any] | str:
    """The arguments as a dict, or a sentence saying why they are not a JSON object."""
    if isinstance(arguments, str):
        text = arguments.strip()
        if not text:
            return {}  # some models send "" for a tool without arguments
        try:
            arguments = json.loads(text)
        except json.JSONDecodeError as exc:
            where = f"{exc.msg} at position {exc.pos}"
            return f"The arguments are not valid JSON ({where}).{_argument_hint(schema)}"
    if not isinstance(arguments, dict):
        return f"The arguments must be a JSON object, not {_json_type(arguments)}.{_argument_hint(schema)}"
    return arguments


def safe_tool_name(text: str, fallback: str) -> str:
    """`text` as a tool name OpenAI-style APIs accept ([A-Za-z0-9_-], at most 64), else `fallback`."""
    return re.sub(r"[^A-Za-z0-9_\-]+", "_", text).strip("_")[:64] or fallback


def explain_validation_error(exc: ValidationError, schema: Mapping[str, Any]) -> str:
    """Turn pydantic's error list into sentences naming each argument and what it expects."""
    problems: dict[str, list[str]] = {}  # location -> what is wrong there (a union gives several)
    for err in exc.errors(include_url=False):
        loc, parent, node = _walk(schema, err["loc"])
        where = _location(loc).removesuffix(": ")
        kind = err["type"]
        if kind == "missing":
            problems.setdefault(f"{where} is required{_describe(node)}", [])
        elif kind == "extra_forbidden":
            valid = ", ".join(parent.get("properties", {})) or "none"
            problems.setdefault(f"{where} is not accepted (valid arguments: {valid})", [])
        else:
            got = json.dumps(err.get("input"), default=str)
            got = got if len(got) <= 60 else got[:57] + "..."
            problems.setdefault(f"{_location(loc)}got {got}", []).append(
                err["msg"].removeprefix("Input should be ")
            )
    parts = []
    for head, wanted in list(problems.items())[:5]:
        if wanted:
            where, _, got = head.rpartition("got ")
            head = f"{where}expected {' or '.join(dict.fromkeys(wanted))}, got {got}"
        parts.append(head)
    more = len(problems) - len(parts)
    tail = f" (and {more} more problems)" if more > 0 else ""
    return "Invalid arguments: " + "; ".join(parts) + tail + "."


def _walk(schema: Mapping[str, Any], raw_loc: Iterable[Any]) -> tuple[list[Any], Mapping[str, Any], Any]:
    """Pydantic's error location without union-member tags, the parent schema, and the schema there."""
    loc: list[Any] = []
    parent: Mapping[str, Any] = schema
    node: Any = schema
    for part in raw_loc:
        if not isinstance(node, Mapping):
            loc.append(part)
            continue
        branches = [b for b in node.get("anyOf", []) if isinstance(b, Mapping)]
        if branches and not isinstance(part, int) and part not in node.get("properties", {}):
            # a tag naming the union member ("int", "Person", "list[int]"): not part of the path
            typed = [b for b in branches if b.get("type") == part or "properties" in b]
            node = typed[0] if typed else branches[0]
            if not ("properties" in node and part in node["properties"]):
                continue
        if isinstance(part, int):
            parent, node = node, node.get("items", {})
        elif part in node.get("properties", {}):
            parent, node = node, node["properties"][part]
        elif isinstance(node.get("additionalProperties"), Mapping):
            parent, node = node, node["additionalProperties"]
        else:
            parent, node = node, {}
        loc.append(part)
    return loc, parent, node


def _location(loc: list[Any]) -> str:
    if not loc:
        return ""
    path = str(loc[0]) + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc[1:])
    return f"argument '{path}': "


def _describe(prop: Any) -> str:
    if not isinstance(prop, Mapping):
        return ""
    kind = prop.get("type")
    if kind is None and "anyOf" in prop:
        kind = " or ".join(str(p.get("type", "object")) for p in prop["anyOf"])
    return f" (expected {kind})" if kind else ""


def _argument_hint(schema: Mapping[str, Any]) -> str:
    properties: Mapping[str, Any] = schema.get("properties", {})
    if not properties:
        return " Send a JSON object, e.g. {}."
    shown = ", ".join(f'"{k}": <{v.get("type", "value")}>' for k, v in list(properties.items())[:6])
    return f" Send a JSON object like {{{shown}}}."


def _json_type(value: Any) -> str:
    return {
        list: "an array",
        str: "a string",
        bool: "a boolean",
        int: "a number",
        float: "a number",
        type(None): "null",
    }.get(type(value), type(value).__name__)


def jsonable(value: Any) -> Any:
    """A tool's return value as plain JSON data (pydantic models, dataclasses, paths included)."""
    return to_jsonable_python(value)


# --- schemas from Python functions --------------------------------------------------------------


def args_model_for(
    fn: Callable[..., Any], arg_docs: Mapping[str, str] | None = None, *, model_name: str = "Args"
) -> type[BaseModel]:
    """A pydantic model (extra="forbid") of a function's parameters, ToolContext ones left out."""
    hints = typing.get_type_hints(fn, include_extras=True)
    docs = arg_docs or {}
    fields: dict[str, Any] = {}
    for param in inspect.signature(fn).parameters.values():
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            raise TypeError(
                f"Tool function '{fn.__name__}' takes *{param.name}: give each argument a name and a type."
            )
        annotation = hints.get(param.name, Any)
        if _is_context(annotation):
            continue
        default = ... if param.default is param.empty else param.default
        # a description from Annotated[..., Field(description=...)] wins unless the docstring has one
        doc = docs.get(param.name)
        fields[param.name] = (annotation, Field(default, description=doc) if doc else default)
    return create_model(model_name, __config__=ConfigDict(extra="forbid"), **fields)


def model_schema(model: type[BaseModel]) -> dict[str, Any]:
    """The model's JSON schema, made easy for a small model (see `simplify_schema`)."""
    return simplify_schema(model.model_json_schema())


def simplify_schema(schema: Mapping[str, Any]) -> dict[str, Any]:
    """A JSON schema with local `$ref`s inlined and titles dropped; it validates the same values.

    Small models and grammar compilers follow a flat schema far better than one full of refs.
    A recursive schema keeps its `$defs` for the refs that cannot be inlined.
    """
    schema = dict(schema)
    defs = schema.pop("$defs", {})
    cleaned = _clean(schema, defs)
    assert isinstance(cleaned, dict)
    if defs and '"$ref"' in json.dumps(cleaned):
        cleaned["$defs"] = {name: _clean(sub, {}) for name, sub in defs.items()}
    if cleaned.get("type") == "object":
        cleaned.setdefault("properties", {})
    return cleaned


def _clean(node: Any, defs: Mapping[str, Any], expanding: frozenset[str] = frozenset()) -> Any:
    """Drop titles and inline `#/$defs/` refs, except a ref inside its own expansion (recursion)."""
    if isinstance(node, list):
        return [_clean(item, defs, expanding) for item in node]
    if not isinstance(node, dict):
        return node
    ref = node.get("$ref")
    name = ref.removeprefix("#/$defs/") if isinstance(ref, str) else None
    if name is not None and name in defs and name not in expanding:
        target = dict(defs[name])
        target.update({k: v for k, v in node.items() if k != "$ref"})
        return _clean(target, defs, expanding | {name})
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key == "title":
            continue
        if key == "properties" and isinstance(value, dict):
            # keys here are argument names (one may well be called "title"), not keywords
            out[key] = {prop: _clean(sub, defs, expanding) for prop, sub in value.items()}
        else:
            out[key] = _clean(value, defs, expanding)
    return out


def _is_context(annotation: Any) -> bool:
    if annotation is ToolContext:
        return True
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _is_context(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        return any(_is_context(a) for a in typing.get_args(annotation) if a is not type(None))
    return False


def _context_params(fn: Callable[..., Any]) -> list[str]:
    hints = typing.get_type_hints(fn, include_extras=True)
    return [name for name, hint in hints.items() if name != "return" and _is_context(hint)]


def _camel(name: str) -> str:
    return "".join(part.capitalize() for part in re.split(r"[^A-Za-z0-9]+", name) if part) or "Tool"


_GOOGLE_SECTION = re.compile(r"^(Args|Arguments|Parameters|Params|Keyword Args|Kwargs):\s*$")
_OTHER_SECTION = re.compile(
    r"^(Returns?|Yields?|Raises?|Examples?|Notes?|See Also|References|Attributes|Warnings?)\s*:?\s*$"
)


_GOOGLE_ARG = re.compile(r"^\*{0,2}(\w+)\s*(\(.*?\))?\s*:\s*(.*)$")  # name (type): description
_NUMPY_ARG = re.compile(r"^\*{0,2}(\w+)\s*(?::.*)?$")  # name : type


def parse_docstring(doc: str) -> tuple[str, dict[str, str]]:
    """(the description, {argument: description}) from a Google- or numpy-style docstring."""
    lines = doc.expandtabs().splitlines()
    summary: list[str] = []
    args: dict[str, str] = {}
    i = 0
    in_summary = True
    while i < len(lines):
        line = lines[i]
        stripped = line.strip()
        next_line = lines[i + 1].strip() if i + 1 < len(lines) else ""
        numpy_header = bool(next_line) and set(next_line) == {"-"}
        if _GOOGLE_SECTION.match(stripped) or (numpy_header and stripped in ("Parameters", "Arguments")):
            in_summary = False
            i += 2 if numpy_header else 1
            i = _read_args(lines, i, args, numpy=numpy_header)
            continue
        if _OTHER_SECTION.match(stripped) or numpy_header:
            in_summary = False
        if in_summary:
            summary.append(stripped)
        i += 1
    return "\n".join(summary).strip(), args


def _read_args(lines: list[str], i: int, args: dict[str, str], *, numpy: bool) -> int:
    """Read one argument section starting at line i; return the first line after it."""
    base_indent: int | None = None
    current: str | None = None
    pattern = _NUMPY_ARG if numpy else _GOOGLE_ARG
    while i < len(lines):
        line = lines[i]
        if not line.strip():
            i += 1
            continue
        indent = len(line) - len(line.lstrip())
        if base_indent is None:
            base_indent = indent
        if indent < base_indent or (not numpy and indent == base_indent and _is_header(line)):
            return i
        if numpy and indent == base_indent and i + 1 < len(lines) and set(lines[i + 1].strip()) == {"-"}:
            return i
        if indent == base_indent:
            match = pattern.match(line.strip())
            if match is None:
                return i
            current = match.group(1)
            args[current] = "" if numpy else match.group(3).strip()
        elif current is not None:
            args[current] = (args[current] + " " + line.strip()).strip()
        i += 1
    return i


def _is_header(line: str) -> bool:
    s = line.strip()
    return bool(_GOOGLE_SECTION.match(s) or _OTHER_SECTION.match(s))
