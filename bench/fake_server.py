"""tests/fake_upstream.py's WSGI app, served the way a production upstream is: with
TCP_NODELAY on its sockets.

gevent's pywsgi does not set TCP_NODELAY. On a keep-alive connection the fake then writes
its response headers, and Nagle holds back the first body chunk until the client's
delayed ACK (40 ms on Linux) arrives: a client that sends its request in one write (wrk,
bench.loadgen) waits ~44 ms per streamed request, so the DIRECT baseline would measure
that artefact instead of the fake. The app code is the very same module.

    python -m bench.fake_server --port P
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests import fake_upstream  # noqa: E402  (monkey-patches on import)

import argparse  # noqa: E402
import socket  # noqa: E402

from gevent.pywsgi import WSGIServer  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--host", default="127.0.0.1")
    args = ap.parse_args(argv)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)   # inherited by accepted sockets
    sock.bind((args.host, args.port))
    sock.listen(4096)
    WSGIServer(sock, fake_upstream.app, log=None, spawn=10000).serve_forever()


if __name__ == "__main__":
    main()
