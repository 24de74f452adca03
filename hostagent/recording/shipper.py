"""Ships spooled events to the collector over one Ingest stream; acks free the spool.

Events go as the spool stores them (frames, not decoded here: the collector decodes).
After any failure it reconnects with capped exponential backoff and resends from the
oldest spool segment: the collector stores a resent event once, so nothing is lost or
duplicated whatever breaks when.
"""
from __future__ import annotations

import asyncio
import logging
import random
import threading
import time

import grpc

from agentgate.client import CollectorAddress, open_aio_channel
from agentgate.wire import pb, rpc
from hostagent.recording.spool import Spool

log = logging.getLogger("agentgate.shipper")


class StreamEnded(Exception):
    pass


class Shipper:
    def __init__(self, spool: Spool, address: CollectorAddress, *, batch_events: int = 2000,
                 batch_bytes: int = 2 << 20, window: int = 4, backoff_min: float = 0.2,
                 backoff_max: float = 10.0, housekeeping: float = 10.0, linger: float = 0.05):
        self.spool = spool
        # After a wake-up, wait this long for more events: one gRPC write per batch, not
        # per event, while the proxy is busy (the recording is already durable locally)
        self.linger = linger
        self.address = address
        self.batch_events = batch_events
        self.batch_bytes = batch_bytes
        self.window = window
        self.backoff_min = backoff_min
        self.backoff_max = backoff_max
        self.housekeeping = housekeeping
        self.connected = False
        self.last_error = ""
        self.sent_events = 0
        self.acked_batches = 0

    async def run(self) -> None:
        """Ship until cancelled."""
        delay = self.backoff_min
        while True:
            before = self.acked_batches
            try:
                await self._stream()
            except grpc.aio.AioRpcError as exc:
                self._failed(f"{exc.code().name}: {exc.details()}")
            except Exception as exc:  # never stop shipping: the spool holds the data
                self._failed(f"{type(exc).__name__}: {exc}")
            finally:
                self.connected = False
            delay = self.backoff_min if self.acked_batches > before else min(delay * 2, self.backoff_max)
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))

    def _failed(self, error: str) -> None:
        if error != self.last_error:
            log.warning("collector %s: %s (will retry; events stay in the spool)",
                        self.address.target, error)
        self.last_error = error

    async def _stream(self) -> None:
        channel = open_aio_channel(self.address)
        try:
            call = rpc.IngestStub(channel).Stream(metadata=self.address.metadata())
            window = asyncio.Semaphore(self.window)
            receiver = asyncio.create_task(self._receive(call, window))
            try:
                await self._send(call, window, receiver)
            finally:
                receiver.cancel()
                call.cancel()
        finally:
            await channel.close()

    async def _until(self, aw, receiver: asyncio.Task, timeout: float | None = None) -> bool:
        """Await `aw` unless the ack stream fails first (then raise its error)."""
        task = asyncio.ensure_future(aw)
        done, _ = await asyncio.wait({task, receiver}, timeout=timeout,
                                     return_when=asyncio.FIRST_COMPLETED)
        if receiver in done:
            task.cancel()
            receiver.result()
            raise StreamEnded("collector closed the ingest stream")
        if task not in done:
            task.cancel()
            return False
        return True

    async def _send(self, call, window: asyncio.Semaphore, receiver: asyncio.Task) -> None:
        loop = asyncio.get_running_loop()
        wake = asyncio.Event()

        loop_thread = threading.get_ident()

        def notify() -> None:
            # the proxy appends on this loop's thread: no self-pipe write needed then
            if threading.get_ident() == loop_thread:
                wake.set()
            else:
                loop.call_soon_threadsafe(wake.set)

        pos = self.spool.start()
        batch_id = 0
        while True:
            wake.clear()
            self.spool.add_listener(notify)   # before reading: no append goes unnoticed
            frames, count, pos = self.spool.read_frames(pos, self.batch_bytes,
                                                        self.batch_events)
            if not count:
                if not await self._until(wake.wait(), receiver, self.housekeeping):
                    self.spool.rotate_if_acked()
                    self.spool.release()
                elif self.linger:
                    await asyncio.sleep(self.linger)
                continue
            # (events acked before a reconnect may go again: the collector stores each once)
            await self._until(window.acquire(), receiver)
            batch_id += 1
            await call.write(pb.IngestBatch(batch_id=batch_id, frames=frames))
            self.sent_events += count

    async def _receive(self, call, window: asyncio.Semaphore) -> None:
        async for ack in call:
            if not self.connected:
                self.connected = True
                if self.last_error:
                    log.info("collector %s: shipping again", self.address.target)
                self.last_error = ""
            for s in ack.sessions:
                self.spool.ack(s.session_id, s.committed_seq)
            self.acked_batches += 1
            window.release()
            self.spool.release()
        raise StreamEnded("collector ended the ingest stream")

    async def drain(self, timeout: float) -> bool:
        """Wait until everything spooled so far is acked (for shutdown and tests)."""
        deadline = time.monotonic() + timeout
        while self.spool.unacked_events_estimate():
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.02)
        return True
