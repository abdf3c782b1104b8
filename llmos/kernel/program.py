"""What crosses between a program and the kernel: the `Reply` of each syscall and its errors.

A program is `async def program(proc: Process, **args) -> result` (the handle is in process.py);
every action it takes is `await proc.syscall(name, **args)`, which returns a `Reply`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from enum import StrEnum
from typing import Any

from pydantic import BaseModel


class ErrorCode(StrEnum):
    DENIED = "denied"  # the process lacks the capability, or the policy or a person said no
    BUDGET = "budget"  # a budget is used up
    INVALID_ARGS = "invalid_args"
    UNKNOWN_SYSCALL = "unknown_syscall"
    NOT_FOUND = "not_found"  # no such process, tool, record, ...
    FAILED = "failed"  # the device or handler failed
    CANCELLED = "cancelled"


class SyscallError(BaseModel):
    code: ErrorCode
    message: str


class SyscallFailed(Exception):
    def __init__(self, name: str, error: SyscallError) -> None:
        super().__init__(f"{name}: {error.message}")
        self.error = error


class Reply(BaseModel):
    """What a syscall returns to the process; journaled as its result.

    `value` is the syscall's result model (its row in the table names it), also when the reply
    is replayed from the journal. `untrusted` says the value holds data from outside (a web
    page, an API, a process that had read such data): the kernel taints the process that gets it.
    """

    ok: bool
    value: Any = None
    error: SyscallError | None = None
    untrusted: bool = False

    @classmethod
    def fail(cls, code: ErrorCode, message: str) -> Reply:
        return cls(ok=False, error=SyscallError(code=code, message=message))

    def unwrap(self) -> Any:
        """The value, or raise SyscallFailed: for programs that treat any error as fatal."""
        if self.error is not None:
            raise SyscallFailed("syscall", self.error)
        return self.value


Dispatch = Callable[[str, dict[str, Any]], Awaitable[Reply]]
Program = Callable[..., Awaitable[Any]]
