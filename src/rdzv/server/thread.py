"""Running a :class:`~rdzv.server.store_server.StoreServer` outside an event loop:
:class:`ServerThread` (its own loop in a daemon thread, what ``TCPStore(is_master=True)``
uses) and :func:`serve` (this thread until a signal, what ``rdzv serve`` uses)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from rdzv.server.loop import new_event_loop, tune_gc
from rdzv.server.store_server import StoreServer

__all__ = ["ServerThread", "serve"]

logger = logging.getLogger("rdzv.server")

_T = TypeVar("_T")


class ServerThread:
    """A :class:`StoreServer` running on its own event loop in a daemon thread.

    ``start()`` returns once the server listens (or raises its bind error); ``stop()``
    shuts it down gracefully and joins the thread. Arguments as :class:`StoreServer`.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, **kwargs: Any) -> None:
        self._args = (host, port)
        self._kwargs = kwargs
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: StoreServer | None = None
        self._error: BaseException | None = None
        self._ready = threading.Event()

    @property
    def server(self) -> StoreServer:
        if self._server is None:
            raise RuntimeError("the server thread is not started")
        return self._server

    @property
    def port(self) -> int:
        return self.server.port

    def start(self) -> ServerThread:
        self._thread = threading.Thread(target=self._run, name="rdzv-store-server", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            self._thread.join()
            raise self._error
        return self

    def _run(self) -> None:
        loop = self._loop = new_event_loop()
        asyncio.set_event_loop(loop)
        try:
            server = StoreServer(*self._args, **self._kwargs)
            loop.run_until_complete(server.start())
        except BaseException as exc:
            self._error = exc
            self._ready.set()
            loop.close()
            return
        self._server = server
        self._ready.set()
        try:
            loop.run_until_complete(server.wait_closed())
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    def call(self, fn: Callable[[StoreServer], _T], timeout: float = 10.0) -> _T:
        """Run ``fn(server)`` on the server's loop and return its result (thread-safe access
        to the server and its engine, e.g. for metrics or tests)."""
        loop = self._loop
        if loop is None:
            raise RuntimeError("the server thread is not started")
        server = self.server

        async def run() -> _T:
            return fn(server)

        return asyncio.run_coroutine_threadsafe(run(), loop).result(timeout)

    def stop(self, timeout: float = 10.0) -> None:
        """Close the server and join its thread (idempotent)."""
        loop, server, thread = self._loop, self._server, self._thread
        if loop is None or server is None or thread is None or not thread.is_alive():
            return
        with contextlib.suppress(RuntimeError):  # loop already closed
            asyncio.run_coroutine_threadsafe(server.close(), loop).result(timeout)
        thread.join(timeout)


def serve(
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    on_listening: Callable[[StoreServer], None] | None = None,
    **kwargs: Any,
) -> None:
    """Run a server in this thread until SIGINT or SIGTERM, then shut down gracefully.

    ``on_listening(server)`` is called once the server listens; then the process's garbage
    collector is set for serving (:func:`~rdzv.server.loop.tune_gc`): this function owns
    the process (it handles its signals).
    """
    import signal

    loop = new_event_loop()
    asyncio.set_event_loop(loop)

    async def main() -> None:
        server = StoreServer(host, port, **kwargs)
        await server.start()
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, stop.set)
        if on_listening is not None:
            on_listening(server)
        tune_gc()
        await stop.wait()
        logger.info("signal received, shutting down")
        await server.close()

    try:
        loop.run_until_complete(main())
    finally:
        loop.close()
