"""Runs in a child OS process: boots a kernel on LLMOS_HOME and runs `three_appends` until killed."""

import asyncio
import sys

from programs import append_line, three_appends

from llmos import Kernel


async def main(path: str) -> None:
    async with Kernel() as kernel:
        kernel.tools.register(append_line)
        pid = await kernel.spawn(three_appends, args={"path": path, "pause_s": 3.0})
        print(pid, flush=True)
        await kernel.wait(pid)


asyncio.run(main(sys.argv[1]))
