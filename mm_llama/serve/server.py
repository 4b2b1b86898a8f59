"""Running the app with uvicorn: in the foreground (`mm-llama serve`) or in a background thread."""
from __future__ import annotations

import socket
import threading
import time

import uvicorn

DEFAULT_HOST = "127.0.0.1"


def serve_forever(app, host: str = DEFAULT_HOST, port: int = 8000, log_level: str = "info") -> None:
    uvicorn.run(app, host=host, port=port, log_level=log_level)


class BackgroundServer:
    """`with BackgroundServer(app) as url:` serves `app` from a thread on `host` and a free port.

    The port is bound before the thread starts, so `url` is valid on entry; leaving the block stops the
    server and waits for it.
    """

    def __init__(self, app, host: str = DEFAULT_HOST, port: int = 0, start_timeout: float = 30.0):
        self.socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.socket.bind((host, port))
        self.host, self.port = self.socket.getsockname()
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]}, daemon=True)
        self.start_timeout = start_timeout

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + self.start_timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the server did not start on {self.url}")
            time.sleep(0.02)
        return self.url

    def stop(self) -> None:
        self.server.should_exit = True
        if self.thread.is_alive():
            self.thread.join(timeout=30)
        self.socket.close()

    def __exit__(self, *exc) -> None:
        self.stop()
