"""`llmos shell`: chat with an agent and run the OS around it (prompt_toolkit for input, rich for output).

A line of text is a task for the current agent, run in the foreground with its steps streamed;
`/spawn TASK` runs one in the background. Slash commands inspect and steer the processes.
"""

from __future__ import annotations

import asyncio
import shlex
from collections.abc import Awaitable, Callable
from typing import Any

from prompt_toolkit import PromptSession
from prompt_toolkit.history import FileHistory
from prompt_toolkit.patch_stdout import patch_stdout
from rich.console import Console
from rich.live import Live
from rich.table import Table

from llmos.agents.agent import AgentSpec, run_agent
from llmos.agents.catalog import AGENTS
from llmos.agents.render import EventPrinter
from llmos.kernel import Kernel, KernelError, State
from llmos.kernel.trace import doing_now, trace_lines
from llmos.memory.store import SHARED, namespace_for_agent

HELP = """\
type a task            run it with the current agent, streaming its steps
/spawn TASK            run a task in the background
/ps [-a]               processes (with -a: finished ones too)
/top [SECONDS]         live: the syscall each process is in, tokens and time
/kill PID              kill a process and its children
/log PID               a process's syscall trace
/approve KEY [no]      answer a pending approval (/approve alone lists them)
/tools                 the tools agents can use
/agents [NAME]         list agents, or switch to one
/model [NAME]          show or switch the model
/mem [QUERY]           memory statistics, or search long-term memory
/help                  this list
/exit                  leave (background processes are interrupted; `llmos resume` continues them)"""


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
            f"llmos shell: agent [bold]{self.agent.name}[/], model [bold]{self._model()}[/]. "
            "/help lists the commands."
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
                try:
                    await self.handle(line)
                except (KernelError, LookupError, ValueError) as exc:
                    self.console.print(f"[red]error:[/] {exc}")

    async def handle(self, line: str) -> None:
        if not line:
            return
        if not line.startswith("/"):
            await self.run_foreground(line)
            return
        name, *args = shlex.split(line[1:]) or [""]
        command = self.commands.get(name)
        if command is None:
            self.console.print(f"unknown command /{name}; /help lists the commands")
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
            self.console.print(f"[red]process {pid} {info.state.value}:[/] {info.error}")

    async def _ask_person(self, approval: dict[str, Any]) -> None:
        answer = await self.session.prompt_async(f"approve {approval['tool']}? [y/N] ")
        self.kernel.approve(approval["key"], answer.strip().lower() in ("y", "yes"))

    async def spawn(self, args: list[str]) -> None:
        if not args:
            raise ValueError("/spawn needs a task")
        pid = await self._spawn(" ".join(args))
        self.console.print(f"process {pid} started in the background")

    async def ps(self, args: list[str]) -> None:
        table = Table("PID", "PPID", "NAME", "STATE", "TOKENS", "TOOLS", "TIME", box=None)
        processes = self.kernel.ps()
        last = processes[-1].pid if processes else None
        for info in processes:
            if info.state.finished and "-a" not in args and info.pid != last:
                continue
            usage = info.usage
            table.add_row(
                str(info.pid), str(info.ppid or "-"), info.name, info.state.value,
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
                str(info.pid), info.name, info.state.value, now.get(info.pid, "-"), str(u.prompt_tokens),
                str(u.completion_tokens), str(u.reused_prompt_tokens), str(u.tool_calls),
                f"{u.wall_time_s:.1f}s",
            )  # fmt: skip
        queue = self.kernel.scheduler.queue("llm")
        table.caption = f"llm: {queue.busy} busy, {queue.waiting} waiting"
        return table

    async def top(self, args: list[str]) -> None:
        seconds = float(args[0]) if args else 5.0
        with Live(self._top_table(), console=self.console, refresh_per_second=4) as live:
            for _ in range(int(seconds * 4)):
                await asyncio.sleep(0.25)
                live.update(self._top_table())

    async def kill(self, args: list[str]) -> None:
        pid = int(args[0])
        await self.kernel.kill(pid)
        self.console.print(f"process {pid} killed")

    async def log(self, args: list[str]) -> None:
        for line in trace_lines(self.kernel.log(int(args[0]))):
            self.console.print(line, markup=False, highlight=False)

    async def approve(self, args: list[str]) -> None:
        if not args:
            for approval in self.kernel.approvals.pending():
                self.console.print(
                    f"[{approval.key}] process {approval.pid}: {approval.tool} ({approval.reason})"
                )
            return
        yes = len(args) < 2 or args[1].lower() not in ("no", "n", "deny")
        approval = self.kernel.approve(args[0], yes)
        self.console.print(f"{approval.state}: {approval.tool} of process {approval.pid}")

    async def tools(self, args: list[str]) -> None:
        for tool in self.kernel.tools:
            self.console.print(
                f"[bold]{tool.name}[/] ({tool.risk.value}): {tool.description.splitlines()[0]}"
            )

    async def agents(self, args: list[str]) -> None:
        if args:
            self.agent = AGENTS[args[0]].model_copy(update={"model": self.agent.model})
            self.console.print(f"agent: {self.agent.name}")
            return
        for name, spec in AGENTS.items():
            mark = "*" if name == self.agent.name else " "
            self.console.print(f"{mark} {name}: tools {', '.join(spec.tools)}")

    async def model(self, args: list[str]) -> None:
        if args:
            with self.console.status(f"loading {args[0]}..."):
                await self.kernel.llm(args[0])
            self.agent = self.agent.model_copy(update={"model": args[0]})
        self.console.print(f"model: {self._model()}")

    async def mem(self, args: list[str]) -> None:
        store = await self.kernel.memory()
        if not args:
            stats = await asyncio.to_thread(store.stats)
            self.console.print(stats.model_dump_json(indent=2), markup=False)
            return
        namespaces = [SHARED, namespace_for_agent(self.agent.name)]
        for hit in await asyncio.to_thread(store.search, " ".join(args), namespaces=namespaces, k=5):
            self.console.print(f"{hit.score:.2f} [{hit.provenance.source}] {hit.text[:200]}", markup=False)

    async def help(self, args: list[str]) -> None:
        self.console.print(HELP, markup=False, highlight=False)
