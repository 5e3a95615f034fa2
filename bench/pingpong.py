"""TCP ping-pong between two pinned processes: what one wake-up of an idle core costs on
this machine (it inflates CPU per request and latency at low load).

    python -m bench.pingpong   # prints {"busy_rtt_us": .., "idle_rtt_us": ..}
"""
from __future__ import annotations

import json
import socket
import statistics
import subprocess
import sys
import time


def server(port):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", port))
    s.listen(1)
    print("ready", flush=True)
    c, _ = s.accept()
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    while True:
        d = c.recv(100)
        if not d:
            return
        c.sendall(d)


def measure(server_core="0", client_core="1", n=200) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = subprocess.Popen(["taskset", "-c", server_core, sys.executable, "-m", "bench.pingpong", "--server",
                            str(port)], stdout=subprocess.PIPE, text=True)
    try:
        srv.stdout.readline()
        out = subprocess.run(["taskset", "-c", client_core, sys.executable, "-m", "bench.pingpong", "--client",
                              str(port), str(n)], capture_output=True, text=True, timeout=60)
        return json.loads(out.stdout)
    finally:
        srv.kill()
        srv.wait()


def client(port, n):
    c = socket.create_connection(("127.0.0.1", port))
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    res = {}
    for name, gap in (("busy_rtt_us", 0.0), ("idle_rtt_us", 0.01)):
        rtts = []
        for _ in range(n):
            if gap:
                time.sleep(gap)
            t0 = time.perf_counter()
            c.sendall(b"x")
            c.recv(100)
            rtts.append((time.perf_counter() - t0) * 1e6)
        res[name] = round(statistics.median(rtts), 1)
    print(json.dumps(res))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--server":
        server(int(sys.argv[2]))
    elif len(sys.argv) > 1 and sys.argv[1] == "--client":
        client(int(sys.argv[2]), int(sys.argv[3]))
    else:
        print(json.dumps(measure()))
