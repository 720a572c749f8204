"""N uvicorn servers on one port: ``python bench/harness/prefork.py SPEC`` forks N workers.

Like ``uvicorn --workers N``, with two differences. Sockets are made with proto=IPPROTO_TCP:
uvicorn's Config.bind_socket leaves proto at 0, so asyncio never sets TCP_NODELAY on accepted
connections, and with h11 (headers and body written separately) every keep-alive request then
waits ~40 ms for the client's delayed ACK (uvicorn issue #3149). And by default (``reuseport``)
every worker listens on its own SO_REUSEPORT socket, so that the kernel spreads connections over
the workers: on one shared socket (``shared``), asyncio accepts up to 100 connections per
wake-up, and the first worker awake usually takes all of a load generator's keep-alive
connections while the others idle.

A separate script (not imported by the harness): the harness stops its whole process group.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from typing import Any


def main(spec: dict[str, Any]) -> None:
    import uvicorn

    sys.path.insert(0, spec["app_dir"])  # what uvicorn's --app-dir does

    def listening_socket() -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if spec["sockets"] == "reuseport":
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((spec["host"], spec["port"]))
        sock.listen(2048)
        return sock

    shared = listening_socket() if spec["sockets"] == "shared" else None
    children = []
    for _ in range(spec["workers"]):
        pid = os.fork()
        if pid == 0:
            sock = shared if shared is not None else listening_socket()
            config = uvicorn.Config(spec["app"], host=spec["host"], port=spec["port"], loop=spec["loop"],
                                    http=spec["http"], access_log=False, log_level="warning")
            uvicorn.Server(config).run(sockets=[sock])
            os._exit(0)
        children.append(pid)
    for pid in children:
        os.waitpid(pid, 0)


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
