"""How the naive servers run their workers: a process per worker, each listening on the shared port.

`run(app, host, port, workers)` starts `workers` processes (`python -m loadtests.baseline.workers
APP HOST PORT`); each binds its own socket to the port with SO_REUSEPORT and serves the FastAPI app
with uvicorn. The kernel spreads new connections over the listening sockets by their addresses.

Why not uvicorn's own `workers=N`: its workers accept from one shared socket, and a closed-loop
client's keep-alive connections stay with whichever worker accepted them. Measured on `tiny` (fp32,
2 workers, 32 connections, 15 s): when one worker took every connection the server did 77 req/s
on 1.45 cores, the other worker idle; when the two shared them, 250 req/s. The split, not the
server, decided the figure, and that was one cause of naive windows that collapsed in the bench.
`balance="shared"` keeps uvicorn's arrangement, to reproduce it.

Every worker's /healthz answers with its pid once its model is loaded, so a client can wait for all
of them (loadtests.servers.wait_workers) before it connects: a worker still loading has no socket yet
and would get no connection.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time

import uvicorn

BALANCES = ("reuseport", "shared")


def run(app: str, host: str, port: int, workers: int, balance: str = "reuseport") -> int:
    """Serve `app` ("module:attribute") on host:port with `workers` processes; returns when they have stopped."""
    if workers <= 1 or balance == "shared":
        uvicorn.run(app, host=host, port=port, workers=workers, log_level="warning", access_log=False)
        return 0
    if balance != "reuseport":
        raise SystemExit(f"balance {balance!r}: use one of {', '.join(BALANCES)}")
    procs = [subprocess.Popen([sys.executable, "-m", "loadtests.baseline.workers", app, host, str(port)])
             for _ in range(workers)]

    def stop(signum: int, _frame: object) -> None:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    # A worker that exits (a crash, a signal) takes the others down: the server is all of them or none.
    while all(p.poll() is None for p in procs):
        time.sleep(0.2)
    stop(signal.SIGTERM, None)
    for p in procs:
        p.wait()
    return max(p.returncode or 0 for p in procs)


def serve_one(app: str, host: str, port: int) -> None:
    """One worker: its own SO_REUSEPORT socket on the shared port, the app served by uvicorn."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    server.run(sockets=[sock])


if __name__ == "__main__":
    serve_one(sys.argv[1], sys.argv[2], int(sys.argv[3]))
    sys.exit(0)
