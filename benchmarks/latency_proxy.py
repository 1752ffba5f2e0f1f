"""A TCP proxy that adds a fixed round-trip time, standing in for the Internet between a
sender and a remote MX (this machine's kernel has no netem).

    python benchmarks/latency_proxy.py LISTEN_PORT TARGET_PORT RTT_MS

Every chunk read on one side is written to the other side RTT/2 later, in order; so a
request and its answer take one RTT in all, like a real path. TLS passes through
untouched (the proxy only moves bytes). Runs in its own process so its work never
competes with the measured client for the same interpreter.
"""

from __future__ import annotations

import asyncio
import sys
import time


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float) -> None:
    queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

    async def deliver() -> None:
        while True:
            due, data = await queue.get()
            if not data:
                break
            wait = due - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            writer.write(data)
            await writer.drain()
        writer.close()

    sender = asyncio.create_task(deliver())
    try:
        while True:
            data = await reader.read(65536)
            queue.put_nowait((time.monotonic() + delay, data))
            if not data:
                break
    except ConnectionError:
        queue.put_nowait((0.0, b""))
    await sender


async def main(listen: int, target: int, rtt_ms: float) -> None:
    delay = rtt_ms / 2000.0

    async def handle(c_reader: asyncio.StreamReader, c_writer: asyncio.StreamWriter) -> None:
        try:
            s_reader, s_writer = await asyncio.open_connection("127.0.0.1", target)
        except OSError:
            c_writer.close()
            return
        # connecting costs one round trip too
        await asyncio.sleep(2 * delay)
        try:
            await asyncio.gather(
                _pump(c_reader, s_writer, delay),
                _pump(s_reader, c_writer, delay),
                return_exceptions=True,
            )
        finally:
            for w in (c_writer, s_writer):
                w.close()

    server = await asyncio.start_server(handle, "127.0.0.1", listen, backlog=512)
    print("ready", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])))
