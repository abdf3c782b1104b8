"""The kernel: processes, syscalls, the journal, the scheduler, and the device protocols."""

from llmos.kernel.devices import Devices
from llmos.kernel.kernel import Kernel, KernelError, SyncKernel
from llmos.kernel.process import Budget, Process, ProcessInfo, State
from llmos.kernel.program import ErrorCode, Reply, SyscallFailed

__all__ = [
    "Budget",
    "Devices",
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
