"""A real uvicorn server on 127.0.0.1 (a free port) in a background thread, for the HTTP tests."""

from __future__ import annotations

import threading
import time

import uvicorn

from search_api.app import create_app
from search_api.timeouts import uvicorn_options
from tests.helpers.processes import free_port


class RunningServer:
    """``create_app(settings)`` served by uvicorn in a daemon thread, for ``with`` blocks."""

    def __init__(self, settings, load_in_background: bool = False):
        self.app = create_app(settings, load_in_background=load_in_background)
        self.port = free_port()
        config = uvicorn.Config(
            self.app,
            host="127.0.0.1",
            port=self.port,
            log_level="warning",
            lifespan="on",
            **uvicorn_options(settings.server),
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> RunningServer:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the test server did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
