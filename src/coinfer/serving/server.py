"""Run the HTTP frontend: the public app and the loopback-only admin app, with uvicorn.

:class:`Server` runs both in one event loop, either in the foreground
(:meth:`Server.run`, used by ``coinfer serve``) or in a background thread
(:meth:`Server.start`, used by the demo, the benchmarks and the tests).
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import uvicorn

from coinfer.errors import CoinferError
from coinfer.serving.app import build_admin_app, build_app
from coinfer.serving.runtime import Runtime, ServeConfig

__all__ = ["Server", "bind_sockets", "serve_bundle", "start_runtime"]


def _bind(host: str, port: int, what: str, option: str) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP, not the default 0: asyncio sets TCP_NODELAY only on accepted sockets whose
    # proto is IPPROTO_TCP; with proto 0, Nagle + delayed ACKs added ~40 ms to every reply
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT only, not a live listener
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        shown = f"[{host}]" if family == socket.AF_INET6 else host
        raise CoinferError(
            f"cannot listen on {shown}:{port} for the {what}: {exc.strerror or exc}; "
            f"choose another {option} (0 picks a free port)"
        ) from None
    return sock


def bind_sockets(host: str, port: int, admin_port: int) -> tuple[socket.socket, socket.socket]:
    """Bind the public socket on ``host:port`` and the admin socket on ``127.0.0.1:admin_port``
    (0: a free port), before anything expensive starts; :class:`Server` then listens on them,
    so no other process can take the ports in between.

    Raises:
        CoinferError: a port is in use or not allowed, naming it.
    """
    public = _bind(host, port, "public API", "--port")
    try:
        admin = _bind("127.0.0.1", admin_port, "admin API", "--admin-port")
    except BaseException:
        public.close()
        raise
    return public, admin


class Server:
    """The frontend of a :class:`Runtime` on ``host:port`` plus the admin API on ``127.0.0.1:admin_port``.

    Port 0 picks a free port; the actual ports are in :attr:`port` and :attr:`admin_port`.
    ``sockets`` are the two sockets of :func:`bind_sockets` (bound here if not given)."""

    def __init__(
        self,
        runtime: Runtime,
        host: str = "127.0.0.1",
        port: int = 8000,
        admin_port: int = 0,
        sockets: tuple[socket.socket, socket.socket] | None = None,
    ):
        self.runtime = runtime
        self.host = host
        self._sockets = sockets if sockets is not None else bind_sockets(host, port, admin_port)
        kw = {"log_level": "warning", "access_log": False, "lifespan": "off"}
        self._main = uvicorn.Server(uvicorn.Config(build_app(runtime), host=host, port=port, **kw))
        self._admin = uvicorn.Server(
            uvicorn.Config(build_admin_app(runtime), host="127.0.0.1", port=admin_port, **kw)
        )
        for s in (self._main, self._admin):
            s.install_signal_handlers = lambda: None  # type: ignore[method-assign]
        self.port, self.admin_port = (s.getsockname()[1] for s in self._sockets)
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
        public, admin = self._sockets
        try:
            await asyncio.gather(self._main.serve(sockets=[public]), self._admin.serve(sockets=[admin]))
        finally:
            close = getattr(self.runtime, "close_channels", None)  # this loop's connections to the workers
            if close is not None:
                await close()

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
        return self

    def close(self) -> None:
        """Stop both apps, then the runtime (its worker processes, and Ray if it started it)."""
        try:
            self.stop()
        finally:
            self.runtime.shutdown()

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def stop(self) -> None:
        """Stop both apps (the runtime is left running; :meth:`close` stops both)."""
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
            if on_started is not None:
                on_started(self)
            await task

        asyncio.run(main())

    def stop_nowait(self) -> None:
        self._main.should_exit = True
        self._admin.should_exit = True


def start_runtime(config: ServeConfig, sockets: tuple[socket.socket, socket.socket]) -> Runtime:
    """:meth:`Runtime.start`, closing the sockets of :func:`bind_sockets` if it fails."""
    try:
        return Runtime.start(config)
    except BaseException:
        for s in sockets:
            s.close()
        raise


def serve_bundle(config: ServeConfig, host: str = "127.0.0.1", port: int = 0, admin_port: int = 0) -> Server:
    """Start a runtime for ``config`` and its frontend in a background thread.

    Both ports are bound first, so a port in use fails within a second, before Ray starts.
    Use it as a context manager (``with serve_bundle(cfg) as server: ...``) or call
    ``server.close()`` when done."""
    sockets = bind_sockets(host, port, admin_port)
    runtime = start_runtime(config, sockets)
    try:
        return Server(runtime, host, port, admin_port, sockets=sockets).start()
    except BaseException:
        for s in sockets:
            s.close()
        runtime.shutdown()
        raise
