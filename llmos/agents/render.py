"""How the CLI and the shell show what a process is doing: one renderer for both.

Text from a model, a tool or a user is never rich markup: it goes into `Text` objects as it is,
and only our own labels carry a style.
"""

from __future__ import annotations

import json
from typing import Any

from rich.console import Console
from rich.syntax import Syntax
from rich.text import Text


class EventPrinter:
    """Prints kernel events (streamed text, agent steps, approvals) of one process tree."""

    def __init__(self, console: Console, pids: set[int] | None = None, stream_text: bool = True) -> None:
        self.console = console
        self.pids = pids  # None: every process
        self.stream_text = stream_text
        self._streaming = False

    def __call__(self, kind: str, data: dict[str, Any]) -> None:
        if self.pids is not None and data.get("pid") not in self.pids:
            return
        if kind == "text" and self.stream_text:
            self.console.print(Text(data["text"], style="dim"), end="", soft_wrap=True)
            self._streaming = True
            return
        if self._streaming:
            self.console.print()
            self._streaming = False
        if kind == "agent":
            self._agent(data)
        elif kind == "approval":
            key = data["key"]
            self.console.print(
                Text.assemble(
                    ("approval needed", "yellow"),
                    f" [{key}] {data['tool']}({_short(data['arguments'])}) because {data['reason']}: ",
                    f"answer with /approve {key} (or `llmos approve {key}`)",
                )
            )

    def _agent(self, data: dict[str, Any]) -> None:
        event, step = data["event"], data["step"]
        if event == "step":
            self.console.rule(Text(f"step {step}"), style="dim")
        elif event == "tool_call":
            arguments = data["arguments"]
            if data["tool"] == "python" and isinstance(arguments.get("code"), str):
                self.console.print(Text("python", style="bold cyan"))
                self.console.print(Syntax(arguments["code"], "python", theme="ansi_dark"))
            else:
                self.console.print(Text.assemble((str(data["tool"]), "bold cyan"), f"({_short(arguments)})"))
        elif event == "tool_result":
            style = "green" if data.get("ok") else "red"
            self.console.print(Text.assemble(("→", style), " ", _short(data["result"], 600)))
        elif event == "answer":
            self.console.print(Text.assemble(("answer:", "bold green"), " ", str(data["answer"])))
        elif event == "error":
            self.console.print(Text.assemble(("error:", "red"), " ", str(data["message"])))


def _short(value: Any, limit: int = 200) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text if len(text) <= limit else text[: limit - 3] + "..."
