"""The `llmos` command."""

from __future__ import annotations

import json
import shutil
import sys
import time
from importlib.metadata import version
from typing import Annotated, Any

import typer
from pydantic import SecretStr
from pydantic_core import to_jsonable_python
from rich.console import Console
from rich.table import Table
from rich.text import Text

from llmos.agents import cli as agent_cli
from llmos.config import Config, ConfigError, config_file_path, load_config
from llmos.cpu.cli import app as models_app
from llmos.kernel.devices import LLMError
from llmos.kernel.journal import Journal
from llmos.kernel.kernel import KernelError, boot_alive
from llmos.kernel.policy import Approvals
from llmos.kernel.process import ProcessInfo, State
from llmos.kernel.trace import doing_now, short, trace_lines
from llmos.kernel.workspace import disk_use
from llmos.memory.cli import app as memory_app
from llmos.memory.store import MemoryStoreError
from llmos.sandbox.cli import app as sandbox_app
from llmos.shell import cli as shell_cli

app = typer.Typer(help="llmos: an operating system whose CPU is a language model.", no_args_is_help=True)
app.add_typer(models_app, name="models")
app.add_typer(sandbox_app, name="sandbox")
app.add_typer(memory_app, name="memory")
app.command()(agent_cli.run)
app.command()(agent_cli.resume)
app.command()(shell_cli.shell)
config_app = typer.Typer(help="Show the configuration", no_args_is_help=True)
app.add_typer(config_app, name="config")

out = Console()
err = Console(stderr=True, soft_wrap=True)  # an error sentence is never broken into lines


def _version(value: bool) -> None:
    if value:
        out.print(f"llmos {version('llmos')}")
        raise typer.Exit()


@app.callback()
def main_options(
    show_version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    pass


def error(message: str) -> Text:
    """`error: MESSAGE`, the message printed as it is (it may hold a user's or a model's text)."""
    return Text.assemble(("error:", "red"), " ", message)


def _shown_state(config: Config, journal: Journal, info: ProcessInfo) -> str:
    """A process left running by a kernel that died shows as interrupted before the next boot says so."""
    if info.state.finished or info.state == State.INTERRUPTED:
        return info.state.value
    boot_id, _ = journal.boot_of(info.pid)
    return info.state.value if boot_alive(config.home / "run", boot_id) else State.INTERRUPTED.value


@app.command()
def ps(
    show_all: Annotated[bool, typer.Option("--all", "-a", help="Include finished processes.")] = False,
) -> None:
    """List processes: state, the syscall each is in now, tokens, tool calls and time used."""
    config = load_config()
    journal = Journal.open_read_only(config.journal_path)
    table = Table(
        "PID", "PPID", "NAME", "STATE", "TRUST", "NOW", "TOKENS", "TOOLS", "SYSCALLS", "TIME", box=None
    )
    if journal is None:
        out.print(table)
        return
    processes = journal.processes()
    running = [info.pid for info in processes if not info.state.finished]
    now = doing_now(journal, running)
    for info in processes:
        state = _shown_state(config, journal, info)
        if not show_all and State(state).finished:
            continue
        usage = info.usage
        doing = now.get(info.pid, "-") if state in (State.RUNNING, State.WAITING, State.BLOCKED) else "-"
        table.add_row(
            str(info.pid),
            str(info.ppid or "-"),
            Text(info.name),
            state,
            "tainted" if info.tainted else "-",  # it read untrusted data: its risky actions ask first
            Text(doing),
            str(usage.tokens),
            str(usage.tool_calls),
            str(usage.syscalls),
            f"{usage.wall_time_s:.1f}s",
        )
    out.print(table)


@app.command()
def prune(
    days: Annotated[
        float, typer.Option(min=0, help="Keep what finished less than this many days ago.")
    ] = 7.0,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only say what would go.")] = False,
) -> None:
    """Delete the workspaces of processes that finished long enough ago (their journal stays)."""
    config = load_config()
    journal = Journal.open_read_only(config.journal_path)
    cutoff = time.time() - days * 86400
    gone, freed = 0, 0
    finished = [State.DONE, State.FAILED, State.KILLED]
    ended = [] if journal is None else journal.processes(finished, with_usage=False)
    for info in ended:
        workspace = config.workspace(info.pid)
        old_enough = info.ended_at is not None and info.ended_at <= cutoff
        if not old_enough or workspace.is_symlink() or not workspace.is_dir():
            continue
        gone, freed = gone + 1, freed + disk_use(workspace)
        if not dry_run:
            shutil.rmtree(workspace)
    verb = "would free" if dry_run else "freed"
    what = f"{gone} workspaces of processes that ended over {days:g} days ago"
    out.print(f"{what}: {verb} {freed / 2**20:.1f} MB", markup=False, highlight=False)


@app.command("log")
def log_command(pid: Annotated[int, typer.Argument(help="Process id, from `llmos ps --all`.")]) -> None:
    """A process's syscall trace, like strace."""
    journal = Journal.open_read_only(load_config().journal_path)
    if journal is None or journal.process(pid, with_usage=False) is None:
        err.print(error(f"No process {pid}; `llmos ps --all` lists them."))
        raise typer.Exit(1)
    for line in trace_lines(journal.events(pid)):
        out.print(Text(line), soft_wrap=True)


@app.command()
def approvals() -> None:
    """List the actions waiting for a person's approval."""
    journal = Journal.open_read_only(load_config().journal_path)
    table = Table("KEY", "PID", "TOOL", "RISK", "WHY", "ARGUMENTS", box=None)
    pending = Approvals(journal.db).pending() if journal and journal.has_table("approvals") else []
    for approval in pending:
        table.add_row(
            Text(approval.key),
            str(approval.pid),
            Text(approval.tool),
            Text(approval.risk),
            Text(approval.reason),
            Text(short(approval.arguments, 60)),
        )
    out.print(table)


@app.command()
def approve(
    key: Annotated[str, typer.Argument(help="The approval's key, from `llmos approvals`.")],
    deny: Annotated[bool, typer.Option("--deny", help="Decline instead of approving.")] = False,
) -> None:
    """Approve (or --deny) a pending action; the blocked process goes on, now or when resumed."""
    config = load_config()
    try:
        if not config.journal_path.is_file():
            raise LookupError(f"No pending approval {key!r}; no process has run here yet.")
        approval = Approvals(Journal(config.journal_path).db).answer(key, approve=not deny)
    except LookupError as exc:
        err.print(error(str(exc)))
        raise typer.Exit(1) from None
    out.print(Text(f"{approval.state}: {approval.tool} of process {approval.pid}"))


@config_app.command("show")
def config_show() -> None:
    """Print the configuration in effect (defaults < OPENAI_* < config file < LLMOS_* variables) as
    TOML-like text; secrets show as set or unset, never their value."""
    config = load_config()
    out.print(Text(f"# file: {config_file_path()}"), soft_wrap=True)
    data = config.model_dump()  # python mode: secrets stay SecretStr, so they are known as such
    sections = {key: value for key, value in data.items() if isinstance(value, dict)}
    for key, value in data.items():
        if not isinstance(value, dict):
            _print_value(key, value)
    for section, values in sections.items():
        _print_section(section, values)


def _print_section(name: str, values: dict[str, Any]) -> None:
    out.print(Text(f"\n[{name}]"))
    nested = {}
    for key, value in values.items():
        if isinstance(value, dict):
            nested[key] = value
        else:
            _print_value(key, value)
    for key, value in nested.items():
        _print_section(f"{name}.{key}", value)


def _print_value(key: str, value: Any) -> None:
    if value is None:
        line = f"# {key} = (unset)"
    elif isinstance(value, SecretStr):
        line = f"# {key} = (set, hidden)"
    else:
        line = f"{key} = {json.dumps(to_jsonable_python(value))}"
    out.print(Text(line), soft_wrap=True)


def main() -> None:
    """Errors a user must fix (config, model, kernel, memory) end as one sentence, not a traceback."""
    try:
        app()
    except (ConfigError, LLMError, KernelError, MemoryStoreError) as exc:
        err.print(error(str(exc)))
        sys.exit(2 if isinstance(exc, ConfigError) else 1)
