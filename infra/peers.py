"""Fast, clear failure of multi-process runs.

When one process of a run dies, the others would block in their next collective until JAX's
heartbeat timeout (`distributed.heartbeat_timeout_s`) aborts them with a C++ stack trace. This
watchdog makes them exit within a second instead, with one line and exit code 5: process 0 holds
a TCP connection to every other process; a process that dies (even by SIGKILL) has its
connections closed by the kernel, which its peers see at once. A process that finishes normally
says goodbye first. A process that hangs while alive is still caught by JAX's heartbeat.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from collections.abc import Iterator

from infra import process
from infra.errors import PeerError

_KEY = "infra/peer_watchdog"
_BYE = b"bye"


def _coordinator_host() -> str:
    from jax._src import distributed

    address = distributed.global_state.coordinator_address or ""
    host = address.rsplit(":", 1)[0].strip("[]")
    return host or socket.gethostname()


class PeerWatchdog:
    """Start with `start()` once `jax.distributed` is up; `close(clean)` at the end of the run."""

    def __init__(self, timeout_s: float = 60.0):
        self.timeout_s = timeout_s
        self.connections: list[socket.socket] = []
        self.finished = False

    def start(self) -> "PeerWatchdog":
        import jax
        from jax._src import distributed

        self.index, self.count = jax.process_index(), jax.process_count()
        client = distributed.global_state.client
        if self.count < 2 or client is None:
            return self
        if self.index == 0:
            server = socket.create_server(("", 0))
            client.key_value_set(_KEY, f"{_coordinator_host()}:{server.getsockname()[1]}")
            server.settimeout(self.timeout_s)
            for _ in range(self.count - 1):
                try:
                    conn, _ = server.accept()
                except OSError:
                    raise PeerError(
                        f"process 0: not every process reached the start of training within "
                        f"{self.timeout_s:.0f} s; see the other processes' logs"
                    ) from None
                peer = int(conn.recv(16).decode() or -1)
                self._watch(conn, f"process {peer}")
            server.close()
        else:
            address = client.blocking_key_value_get(_KEY, int(self.timeout_s * 1000))
            host, port = address.rsplit(":", 1)
            conn = socket.create_connection((host, int(port)), timeout=self.timeout_s)
            conn.sendall(str(self.index).encode().ljust(16))
            self._watch(conn, "process 0")
        return self

    def _watch(self, conn: socket.socket, who: str) -> None:
        conn.settimeout(None)
        self.connections.append(conn)
        threading.Thread(target=self._wait, args=(conn, who), daemon=True).start()

    def _wait(self, conn: socket.socket, who: str) -> None:
        try:
            data = conn.recv(len(_BYE))
        except OSError:
            data = b""
        if data == _BYE or self.finished:
            return
        process.say_last(
            f"error: process {self.index}: lost {who} of this {self.count}-process run (it died "
            f"or stopped on an error; see its log); stopping too. Rerun the same command to resume."
        )
        os._exit(PeerError.exit_code)

    @contextlib.contextmanager
    def failures_reported(self) -> Iterator[None]:
        """In a multi-process run a failed collective almost always means a peer died: say so
        in one line (PeerError, exit 5) instead of the runtime's stack trace."""
        import jax

        try:
            yield
        except jax.errors.JaxRuntimeError as e:
            if self.count < 2:
                raise
            raise PeerError(
                f"process {self.index}: a collective failed ({str(e).strip().splitlines()[0][:160]}); "
                f"another process of this run probably died: see its log, then rerun to resume"
            ) from None

    def close(self, clean: bool) -> None:
        """End watching. `clean`: tell the peers this process is finishing normally."""
        self.finished = True
        for conn in self.connections:
            try:
                if clean:
                    conn.sendall(_BYE)
                conn.close()
            except OSError:
                pass
