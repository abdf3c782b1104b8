"""Tools called the way agents call them: through the kernel's `tool.call` syscall."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from llmos import Kernel
from llmos.config import load_config
from llmos.kernel.process import Process
from llmos.tools import tool
from llmos.tools.files import file_tools
from llmos.tools.langchain import to_langchain


@tool
def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


async def write_then_read(proc: Process) -> dict[str, Any]:
    written = await proc.syscall("tool.call", name="write_file", arguments={"path": "a.txt", "content": "hi"})
    read = await proc.syscall("tool.call", name="read_file", arguments='{"path": "a.txt"}')
    escape = await proc.syscall("tool.call", name="read_file", arguments={"path": "../../journal.sqlite3"})
    return {"written": written.unwrap(), "read": read.unwrap(), "escape": escape.unwrap()}


async def model_mistakes(proc: Process) -> dict[str, Any]:
    unknown = await proc.syscall("tool.call", name="ad", arguments={})
    bad_json = await proc.syscall("tool.call", name="add", arguments='{"a": 1,')
    wrong = await proc.syscall("tool.call", name="add", arguments={"a": "one", "b": 2})
    denied = await proc.syscall("tool.call", name="write_file", arguments={"path": "x", "content": ""})
    return {
        "unknown": unknown.model_dump(mode="json"),
        "bad_json": bad_json.unwrap(),
        "wrong": wrong.unwrap(),
        "denied": denied.model_dump(mode="json"),
    }


async def langchain_in_a_process(proc: Process) -> Any:
    lc = to_langchain(add, process=proc)
    return await lc.ainvoke({"a": 20, "b": 22})


async def test_file_tools_use_the_process_workspace(tmp_path: Path) -> None:
    async with Kernel(load_config(env={"LLMOS_HOME": str(tmp_path)})) as kernel:
        kernel.tools.register(*file_tools())
        pid = await kernel.spawn(write_then_read, capabilities=["tool:*"])
        info = await kernel.wait(pid, timeout_s=60)
        assert info.error is None, info.error
        assert info.result["written"]["ok"] and info.result["read"]["content"]["content"] == "hi"
        assert not info.result["escape"]["ok"] and "'..'" in info.result["escape"]["error"]
        assert (kernel.workspace(pid) / "a.txt").read_text() == "hi"
        assert info.usage.tool_calls == 3


async def files_and_python(proc: Process) -> dict[str, Any]:
    async def call(name: str, **arguments: Any) -> Any:
        return (await proc.syscall("tool.call", name=name, arguments=arguments)).unwrap()

    await call("write_file", path="data/in.txt", content="3 4")
    code = (
        "a, b = map(int, open('data/in.txt').read().split())\n"
        "open('data/in.txt', 'a').write(' 5')\n"
        "open('out.txt', 'w').write(str(a * b))"
    )
    ran = await call("python", code=code)
    appended = await call("write_file", path="out.txt", content="!", append=True)  # a file the code made
    read = await call("read_file", path="out.txt")
    return {"ran": ran, "appended": appended, "read": read}


@pytest.mark.parametrize("backend", ["namespace", "subprocess"])
async def test_file_tools_and_python_share_one_workspace_that_outlives_the_kernel(
    tmp_path: Path, backend: str
) -> None:
    from llmos.tools.python import python

    config = load_config(env={"LLMOS_HOME": str(tmp_path), "LLMOS_SANDBOX__BACKEND": backend})
    async with Kernel(config) as kernel:
        kernel.tools.register(python, *file_tools())
        pid = await kernel.spawn(files_and_python, capabilities=["tool:*"])
        info = await kernel.wait(pid, timeout_s=60)
        workspace = kernel.workspace(pid)
        sandbox = await kernel.sandbox()
        for _ in range(100):  # the finished process's worker is stopped without waiting to idle out
            if str(pid) not in sandbox.running_sessions:  # type: ignore[attr-defined]
                break
            await asyncio.sleep(0.05)
        assert str(pid) not in sandbox.running_sessions  # type: ignore[attr-defined]
    assert info.error is None, info.error
    assert info.result["ran"]["ok"], info.result["ran"]  # python read and appended to write_file's file
    assert info.result["appended"]["ok"], info.result["appended"]  # and write_file to the code's file
    assert info.result["read"]["ok"] and info.result["read"]["content"]["content"] == "12!"
    # The process's files are the user's: they stay after the kernel (and its sandbox) closed.
    assert (workspace / "out.txt").read_text() == "12!"
    assert (workspace / "data" / "in.txt").read_text() == "3 4 5"


async def big_then_small(proc: Process) -> list[Any]:
    replies = []
    for size in (2_000_000, 10_000):
        reply = await proc.syscall(
            "tool.call", name="write_file", arguments={"path": "f", "content": "x" * size}
        )
        replies.append(reply.unwrap())
    return replies


async def test_write_file_keeps_to_the_workspace_limit(tmp_path: Path) -> None:
    config = load_config(env={"LLMOS_HOME": str(tmp_path), "LLMOS_SANDBOX__LIMITS__WORKSPACE_MB": "1"})
    async with Kernel(config) as kernel:
        kernel.tools.register(*file_tools())
        pid = await kernel.spawn(big_then_small, capabilities=["tool:*"])
        info = await kernel.wait(pid, timeout_s=60)
    big, small = info.result
    assert not big["ok"] and "past its limit of 1 MB (sandbox.limits.workspace_mb)" in big["error"]
    assert small["ok"] and small["content"]["bytes_written"] == 10_000


async def test_model_mistakes_come_back_as_data(tmp_path: Path) -> None:
    async with Kernel(load_config(env={"LLMOS_HOME": str(tmp_path)})) as kernel:
        kernel.tools.register(add, *file_tools())
        pid = await kernel.spawn(model_mistakes, capabilities=["tool:add", "tool:read_file"])
        info = await kernel.wait(pid, timeout_s=60)
        assert info.error is None, info.error
        result = info.result
        assert result["unknown"]["error"]["code"] == "not_found"
        assert "Did you mean 'add'?" in result["unknown"]["error"]["message"]
        assert not result["bad_json"]["ok"] and "not valid JSON" in result["bad_json"]["error"]
        assert "argument 'a'" in result["wrong"]["error"]
        assert result["denied"]["error"]["code"] == "denied"


async def test_to_langchain_routes_through_the_kernel(tmp_path: Path) -> None:
    async with Kernel(load_config(env={"LLMOS_HOME": str(tmp_path)})) as kernel:
        kernel.tools.register(add)
        pid = await kernel.spawn(langchain_in_a_process, capabilities=["tool:add"])
        info = await kernel.wait(pid, timeout_s=60)
        assert info.result == 42 and info.usage.tool_calls == 1
