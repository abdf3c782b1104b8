"""`llmos shell`: chat with an agent and run the OS around it (prompt_toolkit for input, rich for output).

A line of text is a task for the current agent, run in the foreground with its steps streamed;
`/spawn TASK` runs one in the background. Slash commands inspect and steer the processes.
"""

from __future__ import annotations

import asyncio
import math
import shlex
from collections.abc import Awaitable, Callable
from typing import Any

from prompt_toolkit import PromptSession
from prompt_toolkit.history import FileHistory
from prompt_toolkit.patch_stdout import patch_stdout
from rich.console import Console
from rich.live import Live
from rich.table import Table
from rich.text import Text

from llmos.agents.agent import AgentSpec, run_agent
from llmos.agents.catalog import AGENTS, agent_spec
from llmos.agents.render import EventPrinter
from llmos.boot import Kernel
from llmos.config import ConfigError
from llmos.kernel import KernelError, State
from llmos.kernel.devices import SHARED, LLMError, namespace_for_agent
from llmos.kernel.trace import doing_now, trace_lines
from llmos.memory.store import MemoryStore, MemoryStoreError

# name -> (how to type it, what it does); /help prints them, a command typed wrongly its own line.
USAGE = {
    "spawn": ("/spawn TASK", "run a task in the background"),
    "ps": ("/ps [-a]", "processes (with -a: finished ones too)"),
    "top": ("/top [SECONDS]", "live: the syscall each process is in, tokens and time"),
    "kill": ("/kill PID", "kill a process and its children"),
    "log": ("/log PID", "a process's syscall trace"),
    "approve": ("/approve [KEY [yes|no]]", "answer a pending approval (/approve alone lists them)"),
    "tools": ("/tools", "the tools agents can use"),
    "agents": ("/agents [NAME]", "list agents, or switch to one"),
    "model": ("/model [NAME]", "show or switch the model"),
    "mem": ("/mem [QUERY]", "memory statistics, or search long-term memory"),
    "help": ("/help", "this list"),
    "exit": ("/exit", "leave (background processes are interrupted; `llmos resume` continues them)"),
}
HELP = "\n".join(
    [f"{'type a task':<26} run it with the current agent, streaming its steps"]
    + [f"{usage:<26} {what}" for usage, what in USAGE.values()]
)
YES, NO = ("yes", "y"), ("no", "n", "deny")


class UsageError(Exception):
    """A command typed with arguments it does not take; the shell answers with its usage line."""

    def __init__(self, command: str) -> None:
        usage, what = USAGE[command]
        super().__init__(f"usage: {usage}  ({what})")


def _error(message: str) -> Text:
    return Text.assemble(("error:", "red"), " ", message)


def _pid(command: str, args: list[str]) -> int:
    if len(args) != 1 or not args[0].isdigit():
        raise UsageError(command)
    return int(args[0])


class Shell:
    def __init__(self, kernel: Kernel, console: Console, agent: AgentSpec) -> None:
        self.kernel = kernel
        self.console = console
        self.agent = agent
        self.printer = EventPrinter(console)
        self.session: PromptSession[str] = PromptSession(
            history=FileHistory(str(kernel.config.home / "history"))
        )
        self.foreground: int | None = None
        self._approvals: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.commands: dict[str, Callable[[list[str]], Awaitable[None]]] = {
            "spawn": self.spawn, "ps": self.ps, "top": self.top, "kill": self.kill, "log": self.log,
            "approve": self.approve, "tools": self.tools, "agents": self.agents, "model": self.model,
            "mem": self.mem, "help": self.help,
        }  # fmt: skip

    async def run(self) -> None:
        self.kernel.listeners.append(self._on_event)
        self.console.print(
            Text.assemble(
                "llmos shell: agent ",
                (self.agent.name, "bold"),
                ", model ",
                (self._model(), "bold"),
                ". /help lists the commands.",
            )
        )
        with patch_stdout(raw=True):
            while True:
                try:
                    line = (await self.session.prompt_async("llmos> ")).strip()
                except KeyboardInterrupt:
                    continue
                except EOFError:
                    break
                if line in ("/exit", "/quit"):
                    break
                await self.answer(line)

    async def answer(self, line: str) -> None:
        """Run one line; whatever was mistyped, the answer is a line of text and the session goes on."""
        try:
            await self.handle(line)
        except UsageError as exc:
            self.console.print(Text(str(exc)))
        except (KernelError, LLMError, MemoryStoreError, ConfigError, LookupError) as exc:
            self.console.print(_error(str(exc)))
        except Exception as exc:  # a bug in a command must not end the session: report it in one line
            self.console.print(_error(f"/{line[1:].split(' ')[0]} failed: {type(exc).__name__}: {exc}"))

    async def handle(self, line: str) -> None:
        if not line:
            return
        if not line.startswith("/"):
            await self.run_foreground(line)
            return
        try:
            words = shlex.split(line[1:])
        except ValueError as exc:  # "No closing quotation"
            self.console.print(_error(f"{exc} in {line!r}; quote a phrase with matching quotes."))
            return
        name, *args = words or [""]
        command = self.commands.get(name)
        if command is None:
            self.console.print(Text(f"unknown command /{name}; /help lists the commands"))
            return
        await command(args)

    def _on_event(self, kind: str, data: dict[str, Any]) -> None:
        self.printer(kind, data)
        if kind == "approval" and data.get("pid") == self.foreground:
            self._approvals.put_nowait(data)

    def _model(self) -> str:
        return self.agent.model or self.kernel.config.llm.model

    async def _spawn(self, task: str) -> int:
        args = {"spec": self.agent.model_dump(), "task": task}
        return await self.kernel.spawn(run_agent, name=self.agent.name, args=args)

    async def run_foreground(self, task: str) -> None:
        pid = await self._spawn(task)
        self.foreground = pid
        finished = asyncio.ensure_future(self.kernel.wait(pid))
        try:
            while not finished.done():
                asked = asyncio.ensure_future(self._approvals.get())
                await asyncio.wait({finished, asked}, return_when=asyncio.FIRST_COMPLETED)
                if asked.done():
                    await self._ask_person(asked.result())
                else:
                    asked.cancel()
        except asyncio.CancelledError:
            await self.kernel.kill(pid)
            raise
        finally:
            self.foreground = None
        info = finished.result()
        if info.state != State.DONE:
            self.console.print(Text.assemble((f"process {pid} {info.state.value}:", "red"), f" {info.error}"))

    async def _ask_person(self, approval: dict[str, Any]) -> None:
        answer = await self.session.prompt_async(f"approve {approval['tool']}? [y/N] ")
        self.kernel.approve(approval["key"], answer.strip().lower() in ("y", "yes"))

    async def spawn(self, args: list[str]) -> None:
        if not args:
            raise UsageError("spawn")
        pid = await self._spawn(" ".join(args))
        self.console.print(Text(f"process {pid} started in the background"))

    async def ps(self, args: list[str]) -> None:
        if args not in ([], ["-a"]):
            raise UsageError("ps")
        table = Table("PID", "PPID", "NAME", "STATE", "TRUST", "TOKENS", "TOOLS", "TIME", box=None)
        processes = self.kernel.ps()
        last = processes[-1].pid if processes else None
        for info in processes:
            if info.state.finished and "-a" not in args and info.pid != last:
                continue
            usage = info.usage
            table.add_row(
                str(info.pid), str(info.ppid or "-"), Text(info.name), info.state.value,
                "tainted" if info.tainted else "-",
                str(usage.tokens), str(usage.tool_calls), f"{usage.wall_time_s:.1f}s",
            )  # fmt: skip
        self.console.print(table)

    def _top_table(self) -> Table:
        columns = ("PID", "NAME", "STATE", "NOW", "PROMPT", "COMPLETION", "REUSED", "TOOLS", "TIME")
        table = Table(*columns, title="llmos top")
        running = [info for info in self.kernel.ps() if not info.state.finished]
        now = doing_now(self.kernel.journal, [info.pid for info in running])
        for info in running:
            u = info.usage
            table.add_row(
                str(info.pid), Text(info.name), info.state.value, Text(now.get(info.pid, "-")),
                str(u.prompt_tokens), str(u.completion_tokens), str(u.reused_prompt_tokens),
                str(u.tool_calls), f"{u.wall_time_s:.1f}s",
            )  # fmt: skip
        queue = self.kernel.scheduler.queue("llm")
        table.caption = f"llm: {queue.busy} busy, {queue.waiting} waiting"
        return table

    async def top(self, args: list[str]) -> None:
        seconds = 5.0
        if args:
            try:
                seconds = float(args[0])
            except ValueError:
                raise UsageError("top") from None
        if len(args) > 1 or not (0 < seconds < math.inf):
            raise UsageError("top")
        with Live(self._top_table(), console=self.console, refresh_per_second=4) as live:
            for _ in range(int(seconds * 4)):
                await asyncio.sleep(0.25)
                live.update(self._top_table())

    async def kill(self, args: list[str]) -> None:
        pid = _pid("kill", args)
        info = self.kernel.process(pid)  # "No process N" before anything is done
        if info.state.finished:
            self.console.print(Text(f"process {pid} has already ended ({info.state.value})"))
            return
        await self.kernel.kill(pid)
        self.console.print(Text(f"process {pid} killed"))

    async def log(self, args: list[str]) -> None:
        pid = _pid("log", args)
        self.kernel.process(pid)  # "No process N" rather than an empty trace
        for line in trace_lines(self.kernel.log(pid)):
            self.console.print(Text(line), soft_wrap=True)

    async def approve(self, args: list[str]) -> None:
        if len(args) > 2 or (len(args) == 2 and args[1].lower() not in YES + NO):
            raise UsageError("approve")
        if not args:
            pending = self.kernel.approvals.pending()
            for approval in pending:
                self.console.print(
                    Text(f"[{approval.key}] process {approval.pid}: {approval.tool} ({approval.reason})")
                )
            if not pending:
                self.console.print(Text("no approval is pending"))
            return
        yes = len(args) == 1 or args[1].lower() in YES
        approval = self.kernel.approve(args[0], yes)
        self.console.print(Text(f"{approval.state}: {approval.tool} of process {approval.pid}"))

    async def tools(self, args: list[str]) -> None:
        if args:
            raise UsageError("tools")
        for tool in self.kernel.tools:
            summary = (tool.description.splitlines() or [""])[0]
            self.console.print(Text.assemble((tool.name, "bold"), f" ({tool.risk.value}): {summary}"))

    async def agents(self, args: list[str]) -> None:
        if len(args) > 1:
            raise UsageError("agents")
        if args:
            try:
                spec = agent_spec(args[0])
            except KeyError as exc:
                self.console.print(_error(str(exc.args[0])))
                return
            self.agent = spec.model_copy(update={"model": self.agent.model})
            self.console.print(Text(f"agent: {self.agent.name}"))
            return
        for name, spec in AGENTS.items():
            mark = "*" if name == self.agent.name else " "
            self.console.print(Text(f"{mark} {name}: tools {', '.join(spec.tools)}"))

    async def model(self, args: list[str]) -> None:
        if len(args) > 1:
            raise UsageError("model")
        if args:
            try:
                with self.console.status(Text(f"loading {args[0]}...")):
                    await self.kernel.llm(args[0])
            except LLMError as exc:
                self.console.print(_error(f"{exc} The model stays {self._model()}."))
                return
            self.agent = self.agent.model_copy(update={"model": args[0]})
        self.console.print(Text(f"model: {self._model()}"))

    async def mem(self, args: list[str]) -> None:
        store = await self.kernel.memory()
        if not args:
            if not isinstance(store, MemoryStore):
                self.console.print(_error("This kernel's memory device keeps no statistics."))
                return
            stats = await asyncio.to_thread(store.stats)
            self.console.print(Text(stats.model_dump_json(indent=2)))
            return
        namespaces = [SHARED, namespace_for_agent(self.agent.name)]
        hits = await asyncio.to_thread(store.search, " ".join(args), namespaces=namespaces, k=5)
        for hit in hits:
            self.console.print(Text(f"{hit.score:.2f} [{hit.provenance.source}] {hit.text[:200]}"))
        if not hits:
            self.console.print(Text("no matching memories"))

    async def help(self, args: list[str]) -> None:
        self.console.print(Text(HELP))
