"""Group commit for the delivery hot path.

Every SMTP connection of a delivery run wants two commits per message: "the body is
about to leave" and "this is what the server said". Done one by one on the event loop,
they cost more than the SMTP exchange itself. ``GroupCommitter`` queues the writes of all
connections and commits whatever has gathered in one transaction, in a writer thread, so
the event loop keeps serving sockets while the database works.

The queue is first in, first out and each batch is one transaction: a write submitted
after another is never committed before it. The engine relies on that: a connection
records message N, then waits for "message N+1 is being sent" to commit before the body
of N+1 leaves, so N's outcome is durable by then.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from recapito.ledger.store import Ledger, LedgerOp


class GroupCommitter:
    def __init__(self, ledger: Ledger, *, max_batch: int = 1000) -> None:
        self.ledger = ledger
        self.max_batch = max_batch
        self.batches = 0
        self.writes = 0
        self._pending: list[tuple[LedgerOp, asyncio.Future[bool]]] = []
        self._wake = asyncio.Event()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="ledger-writer")
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._in_flight: list[asyncio.Future[bool]] = []

    def submit(self, op: LedgerOp) -> asyncio.Future[bool]:
        """Queue one write; the future resolves once it is committed (or failed)."""
        if self._closed:
            raise RuntimeError("the group committer is closed")
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._pending.append((op, future))
        self._wake.set()
        return future

    async def write(self, ops: Sequence[LedgerOp]) -> list[bool]:
        """Queue writes and wait for their commit."""
        return list(await asyncio.gather(*(self.submit(op) for op in ops)))

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._pending:
                batch = self._pending[: self.max_batch]
                del self._pending[: self.max_batch]
                ops = [op for op, _ in batch]
                self._in_flight = [future for _, future in batch]
                try:
                    answers = await loop.run_in_executor(self._executor, self.ledger.apply, ops)
                except Exception as exc:  # the database said no: every waiter hears it
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(exc)
                    continue
                self.batches += 1
                self.writes += len(batch)
                for (_, future), answer in zip(batch, answers, strict=True):
                    if not future.done():
                        future.set_result(answer)

    async def close(self) -> None:
        """Commit what is queued, then stop the writer thread."""
        self._closed = True
        pending = self._in_flight + [future for _, future in self._pending]
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._executor.shutdown(wait=True)
