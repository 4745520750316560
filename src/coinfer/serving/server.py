"""Run the HTTP frontend: the public app and the loopback-only admin app, with uvicorn.

:class:`Server` runs both in one event loop, either in the foreground
(:meth:`Server.run`, used by ``coinfer serve``) or in a background thread
(:meth:`Server.start`, used by the demo, the benchmarks and the tests).
"""

from __future__ import annotations

import asyncio
import threading
import time

import uvicorn

from coinfer.errors import CoinferError
from coinfer.serving.app import build_admin_app, build_app
from coinfer.serving.runtime import Runtime, ServeConfig

__all__ = ["Server", "serve_bundle"]


class Server:
    """The frontend of a :class:`Runtime` on ``host:port`` plus the admin API on ``127.0.0.1:admin_port``.

    Port 0 picks a free port; the actual ports are in :attr:`port` and :attr:`admin_port`
    once started."""

    def __init__(self, runtime: Runtime, host: str = "127.0.0.1", port: int = 8000, admin_port: int = 0):
        self.runtime = runtime
        self.host = host
        kw = {"log_level": "warning", "access_log": False, "lifespan": "off"}
        self._main = uvicorn.Server(uvicorn.Config(build_app(runtime), host=host, port=port, **kw))
        self._admin = uvicorn.Server(
            uvicorn.Config(build_admin_app(runtime), host="127.0.0.1", port=admin_port, **kw)
        )
        for s in (self._main, self._admin):
            s.install_signal_handlers = lambda: None  # type: ignore[method-assign]
        self.port, self.admin_port = port, admin_port
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::") else self.host
        return f"http://{host}:{self.port}"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    async def serve(self) -> None:
        """Serve until :meth:`stop`."""
        await asyncio.gather(self._main.serve(), self._admin.serve())

    def _record_ports(self) -> None:
        self.port = self._main.servers[0].sockets[0].getsockname()[1]
        self.admin_port = self._admin.servers[0].sockets[0].getsockname()[1]

    def start(self, timeout_s: float = 30.0) -> Server:
        """Serve in a background thread; return once both apps listen."""

        def target() -> None:
            try:
                asyncio.run(self.serve())
            except BaseException as exc:  # surfaced by start()
                self._error = exc

        self._thread = threading.Thread(target=target, name="coinfer-frontend", daemon=True)
        self._thread.start()
        t0 = time.monotonic()
        while not (self._main.started and self._admin.started):
            if self._error is not None or not self._thread.is_alive():
                raise CoinferError(f"the HTTP frontend failed to start: {self._error}")
            if time.monotonic() - t0 > timeout_s:
                raise CoinferError(f"the HTTP frontend did not start within {timeout_s:g}s")
            time.sleep(0.02)
        self._record_ports()
        return self

    def stop(self) -> None:
        """Stop both apps (the runtime is left running)."""
        self._main.should_exit = True
        self._admin.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)

    def run(self, on_started=None) -> None:
        """Serve in the foreground until SIGINT/SIGTERM."""
        import signal

        async def main() -> None:
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, self.stop_nowait)
            task = asyncio.ensure_future(self.serve())
            while not (self._main.started and self._admin.started):
                if task.done():
                    task.result()
                    return
                await asyncio.sleep(0.02)
            self._record_ports()
            if on_started is not None:
                on_started(self)
            await task

        asyncio.run(main())

    def stop_nowait(self) -> None:
        self._main.should_exit = True
        self._admin.should_exit = True


def serve_bundle(config: ServeConfig, host: str = "127.0.0.1", port: int = 0, admin_port: int = 0) -> Server:
    """Start a runtime for ``config`` and its frontend in a background thread.

    Call ``server.stop()`` then ``server.runtime.shutdown()`` when done."""
    runtime = Runtime.start(config)
    try:
        return Server(runtime, host, port, admin_port).start()
    except BaseException:
        runtime.shutdown()
        raise
