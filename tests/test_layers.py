"""The layers depend one way: HTTP surfaces → router → providers. A provider never
imports the HTTP layer; what it tells the surface (the key that answered, the next chunk
already in hand) goes through gateway.reqctx."""
import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _imports(path):
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            yield node.module


def test_providers_never_import_the_http_layer():
    bad = []
    for dirpath, _, files in os.walk(os.path.join(ROOT, "providers")):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(dirpath, f)
                bad += [f"{os.path.relpath(path, ROOT)}: {m}" for m in _imports(path)
                        if m == "gateway.http" or m.startswith("gateway.http.") or m == "flask"]
    assert not bad, bad


def test_chunks_a_provider_marks_as_already_in_hand_go_out_in_one_write():
    from gateway.canonical import Chunk
    from gateway.http.streaming import Tally, stream_body
    from gateway.reqctx import more_ready

    def burst(n):      # a provider that parsed n chunks from one read
        for i in range(n):
            hint = more_ready.get()
            hint[0] = i < n - 1
            yield Chunk(content=f"t{i} ", done=i == n - 1)

    def alone(n):      # a provider that never says (local models)
        for i in range(n):
            yield Chunk(content=f"t{i} ", done=i == n - 1)

    class Lines:
        heartbeat = None
        error = str

        @staticmethod
        def chunk(ch):
            return ch.content + "\n"

    writes = list(stream_body(burst(5), Tally(0.0), Lines))
    assert writes == [b"t0 \nt1 \nt2 \nt3 \nt4 \n"]
    assert len(list(stream_body(alone(5), Tally(0.0), Lines))) == 5
    assert more_ready.get() is None, "the hint is gone once the stream ends"
