"""Serves the admin app from a thread of the service (uvicorn on a socket bound here).

The socket is bound before the server thread starts, so a port in use is a
start-up error that names the setting to change, not a line lost in a thread.
"""

from __future__ import annotations

import errno
import logging
import socket
import threading
import time

import uvicorn

from ..config import AdminConfig
from ..errors import ConfigError
from .actions import Echoes
from .app import create_app
from .auth import TokenCheck
from .facts import BoxFacts

__all__ = ["AdminServer"]

log = logging.getLogger(__name__)


class AdminServer:
    """The admin page's HTTP server. ``start()`` binds and serves; ``stop()`` closes."""

    def __init__(self, config: AdminConfig, facts: BoxFacts) -> None:
        self.config = config
        self.facts = facts
        # Read now: a missing or short token file refuses the start, before any scan is taken.
        self.token = TokenCheck.from_file(config.token_file)
        self.app = create_app(
            facts,
            token=self.token,
            read_only=lambda: facts.config().admin.read_only,
            echoes=Echoes(),
        )
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._socket: socket.socket | None = None
        #: The port bound (Admin.Port, or the one chosen for 0).
        self.port = config.port

    @property
    def url(self) -> str:
        host = self.config.bind
        shown = f"[{host}]" if ":" in host else host
        return f"http://{shown}:{self.port}/"

    def start(self) -> None:
        family = socket.AF_INET6 if ":" in self.config.bind else socket.AF_INET
        # IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on sockets that say TCP (the accepted ones
        # inherit it); without it a keep-alive client waits 40 ms for each answer (Nagle + delayed ACK).
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.config.bind, self.config.port))
        except OSError as exc:
            sock.close()
            why = (
                "is in use (another edge-runtime, or another program)"
                if exc.errno == errno.EADDRINUSE
                else (f"cannot be bound: {exc.strerror}")
            )
            raise ConfigError(
                f"The admin page's address {self.config.bind}:{self.config.port} {why}.",
                action="Set Admin.Port (or Admin.Bind) to a free one, or Admin.Enabled to false.",
            ) from exc
        sock.listen(64)
        sock.set_inheritable(False)
        self._socket = sock
        self.port = int(sock.getsockname()[1])
        config = uvicorn.Config(
            self.app,
            log_level="warning",
            access_log=False,
            lifespan="off",
            server_header=False,
            timeout_graceful_shutdown=2,
            # uvicorn's own loggers go through the service's handlers (its format, names scrubbed).
            log_config=None,
        )
        server = uvicorn.Server(config)
        self._server = server
        self._thread = threading.Thread(
            target=server.run, kwargs={"sockets": [sock]}, name="admin-page", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + 10
        while not server.started and self._thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.02)
        if not server.started:
            self.stop()
            raise ConfigError(
                f"The admin page on {self.url} did not start (see the errors above).",
                action="Set Admin.Enabled to false to run without it, and send the service log to "
                "HealthDiag support.",
            )
        log.info(
            "admin page on %s (%s)",
            self.url,
            "token required" if self.token.required else "this machine only, no token",
        )

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._socket is not None:
            self._socket.close()
