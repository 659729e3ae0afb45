"""Run the server in a background thread of this process (tests, benchmarks, notebooks): a real uvicorn server on a
loopback port, stopped gracefully."""

from __future__ import annotations

import threading
import time

import uvicorn


class BackgroundServer:
    """``with BackgroundServer(app) as server: ... server.url ...``: uvicorn on ``host`` and a free port.

    Args:
        app: the ASGI application (:func:`~mini_omni2.serving.app.create_app`).
        host: the address to listen on; ``port`` 0 picks a free one.
        graceful_timeout: seconds open connections get at shutdown before they are closed.
    """

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, graceful_timeout: float = 10.0,
                 log_level: str = "warning") -> None:
        config = uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on",
                                timeout_graceful_shutdown=int(graceful_timeout), ws_max_size=64 * 1024 * 1024)
        self.server = uvicorn.Server(config)
        self.thread: threading.Thread | None = None
        self.host = host
        self.port = port

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 30.0) -> "BackgroundServer":
        self.thread = threading.Thread(target=self.server.run, name="uvicorn", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        return self

    def stop(self, timeout: float = 60.0) -> None:
        self.server.should_exit = True
        if self.thread is not None:
            self.thread.join(timeout)
            self.thread = None

    def __enter__(self) -> "BackgroundServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


__all__ = ["BackgroundServer"]
