"""The kernel: processes, syscalls, the journal, the scheduler."""

from llmos.kernel.kernel import Kernel, KernelError, SyncKernel
from llmos.kernel.process import Budget, Process, ProcessInfo, State
from llmos.kernel.syscalls import ErrorCode, Reply, SyscallFailed

__all__ = [
    "Budget",
    "ErrorCode",
    "Kernel",
    "KernelError",
    "Process",
    "ProcessInfo",
    "Reply",
    "State",
    "SyncKernel",
    "SyscallFailed",
]
