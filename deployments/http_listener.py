"""The ingress's own HTTP listener: clients reach the OpenAI app without Serve's proxy.

Through Serve's HTTP proxy a request crosses one more process each way: the
proxy parses HTTP, calls the ingress replica, which calls back into the proxy
for the request body, and every streamed chunk goes ingress -> proxy ->
client. On 2 cores that hop cost as much as it carried: serve_load (SmolLM2
bf16, 64 x 128/128, two alternating runs each) gave TTFT p50 149 / 133 ms
direct against 169 / 176 ms through the proxy at 2 requests/s, TPOT p50 22 / 20
against 28 / 25 ms, and 514 / 452 against 451 / 418 output tokens/s unbounded.
vLLM's API server is the same shape: the HTTP server lives next to the code
that answers.

Each ingress replica runs uvicorn on its own event loop, on a socket bound
with SO_REUSEPORT, so the ingress replicas of a node share one port and the
kernel spreads connections over them. The socket is bound in the constructor:
a port that cannot be bound fails the replica at once, not at the first request.
"""

from __future__ import annotations

import asyncio
import socket
from typing import Any, Optional


def reuseport_socket(host: str, port: int, backlog: int = 2048) -> socket.socket:
    """A listening TCP socket on host:port that other SO_REUSEPORT sockets of this user may share."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        sock.listen(backlog)
    except OSError as e:
        sock.close()
        raise OSError(e.errno, f"cannot serve HTTP on {host}:{port}: {e.strerror or e}") from None
    sock.setblocking(False)
    return sock


class HttpListener:
    """Serves an ASGI app on host:port from the running event loop (uvicorn), until `stop`.

    Args:
        app: the ASGI app (the ingress's FastAPI app, Guard included).
        host, port: where to listen; the port may be shared with other listeners (SO_REUSEPORT).
    """

    def __init__(self, app: Any, host: str, port: int):
        import uvicorn

        self._socket = reuseport_socket(host, port)
        # No lifespan (the ingress is built already), no access log (one line per request is CPU on the hot path).
        config = uvicorn.Config(app, lifespan="off", log_level="warning", access_log=False, timeout_keep_alive=30)
        self._server = uvicorn.Server(config)
        self._task: Optional[asyncio.Task] = None

    def start(self) -> None:
        """Start serving on the current thread's running loop (a Serve replica's)."""
        self._task = asyncio.get_running_loop().create_task(self._server.serve(sockets=[self._socket]))

    @property
    def serving(self) -> bool:
        """Whether uvicorn is still running (it stops on `stop`, or on an error of its own)."""
        return self._task is not None and not self._task.done()

    async def stop(self) -> None:
        """Close the socket and let uvicorn finish the connections it holds."""
        self._server.should_exit = True
        if self._task is not None:
            await self._task
        self._socket.close()
