"""Programs for the taint tests: each path an injected instruction can travel, as a compromised
model would use it. A tool's output carries the instruction; the process that ends up holding it
"obeys" it by running a command (an execute action). Module-level, so the kernel can spawn them."""

from __future__ import annotations

from programs import fetch_page, run_command

from llmos.kernel.process import Process
from llmos.tools.registry import Risk, tool

TOOLS = (fetch_page, run_command)
__all__ = ["TOOLS", "fetch_page", "run_command"]


@tool(risk=Risk.WRITE)
def save_note(text: str) -> str:
    """Save a note somewhere outside (a write action).

    Args:
        text: the note.
    """
    return f"saved {text}"


async def fetch(proc: Process) -> str:
    reply = await proc.syscall("tool.call", name="fetch_page", arguments={"url": "http://127.0.0.1/"})
    return str(reply.unwrap().content)


async def obey(proc: Process, instruction: str) -> object:
    """What a compromised model does with an instruction: run it."""
    reply = await proc.syscall("tool.call", name="run_command", arguments={"command": instruction})
    return reply.value.content if reply.ok else reply.error.code  # type: ignore[union-attr]


async def obey_twice(proc: Process) -> list[object]:
    text = await fetch(proc)
    return [await obey(proc, text), await obey(proc, text)]


async def fetch_then_save(proc: Process) -> object:
    text = await fetch(proc)
    reply = await proc.syscall("tool.call", name="save_note", arguments={"text": text})
    return reply.value.content if reply.ok else reply.error.code  # type: ignore[union-attr]


# --- msg.send ---------------------------------------------------------------------------------------


async def fetch_and_tell(proc: Process, to: int) -> None:
    (await proc.syscall("msg.send", to=to, body=await fetch(proc))).unwrap()


async def tell(proc: Process, to: int, text: str) -> None:
    (await proc.syscall("msg.send", to=to, body=text)).unwrap()


async def obey_mail(proc: Process) -> object:
    mail = (await proc.syscall("msg.wait")).unwrap()
    return await obey(proc, mail.body)


# --- proc.spawn arguments ---------------------------------------------------------------------------


async def fetch_and_spawn(proc: Process) -> object:
    text = await fetch(proc)
    child = (
        await proc.syscall("proc.spawn", program=f"{__name__}:obey_argument", args={"text": text})
    ).unwrap()
    return (await proc.syscall("proc.wait", pid=child)).unwrap().result


async def obey_argument(proc: Process, text: str) -> object:
    return await obey(proc, text)


# --- proc.wait results ------------------------------------------------------------------------------


async def fetcher(proc: Process) -> str:
    return await fetch(proc)


async def wait_and_obey(proc: Process) -> object:
    child = (await proc.syscall("proc.spawn", program=f"{__name__}:fetcher")).unwrap()
    exit = (await proc.syscall("proc.wait", pid=child)).unwrap()
    return await obey(proc, exit.result)


# --- memory -----------------------------------------------------------------------------------------


async def fetch_and_remember(proc: Process) -> list[str]:
    text = await fetch(proc)
    record = {"text": f"Standing instruction: {text}", "namespace": "shared", "trust": "model"}
    return list((await proc.syscall("mem.add", records=[record])).unwrap())


async def remember_plainly(proc: Process, text: str) -> list[str]:
    record = {"text": f"Standing instruction: {text}", "namespace": "shared", "trust": "model"}
    return list((await proc.syscall("mem.add", records=[record])).unwrap())


async def recall_and_obey(proc: Process) -> object:
    hits = (
        await proc.syscall("mem.search", query="standing instruction", namespaces=["shared"], k=1)
    ).unwrap()
    return await obey(proc, hits[0].text)


# --- files ------------------------------------------------------------------------------------------


async def fetch_and_write(proc: Process) -> object:
    text = await fetch(proc)
    args = {"path": "plan.txt", "content": text}
    reply = await proc.syscall("tool.call", name="write_file", arguments=args)
    return reply.value.content if reply.ok else reply.error.code  # type: ignore[union-attr]

