"""Reading the local store when no collector answers: after `agentgate run` on a machine
with no collector, `agentgate sessions list` still shows what was recorded. A collector
is started in this process, on the default SQLite database, for this command only."""
from __future__ import annotations

import asyncio
import atexit
import shutil
import tempfile
import threading
from pathlib import Path


class LocalCollector:
    def __init__(self, database: Path):
        self.database = database
        self.address = ""
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._main, name="local-collector", daemon=True)
        self._thread.start()
        self._ready.wait(30)
        if self._error:
            raise self._error
        atexit.register(self.close)

    def _main(self) -> None:
        asyncio.run(self._serve())

    async def _serve(self) -> None:
        from collector.config import CollectorConfig
        from collector.server import start_collector
        try:
            # a unix socket in a private directory: in open mode every caller is admin
            self._dir = tempfile.mkdtemp(prefix="agentgate-cli-")
            c = await start_collector(CollectorConfig(listen=f"unix:{self._dir}/collector.sock",
                                                      database=str(self.database)))
        except BaseException as exc:
            self._error = exc
            self._ready.set()
            return
        self.address = c.addresses[0]
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self._ready.set()
        await self._stop.wait()
        await c.stop(0)

    def close(self) -> None:
        if self._loop and self._stop and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._stop.set)
            self._thread.join(5)
        shutil.rmtree(getattr(self, "_dir", ""), ignore_errors=True)
