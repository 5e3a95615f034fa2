"""`make bench`, API surfaces: gateway CPU per streamed request on each surface that relays
the same upstream answer (the fake's 32 chunks, 0 ms apart): /v1/chat/completions,
/v1/messages (Anthropic) and /v1/responses (OpenAI Responses).

    .venv/bin/python -m bench.surfaces                 # 6 rounds of 2 s per surface
    .venv/bin/python -m bench.surfaces --quick --no-md # 1 round of 2 s

One gunicorn worker (bench.run.Gateway, pinned to core 0) against bench.run's fake upstream;
bench/loadgen.py drives each surface in turn, the surfaces interleaved round by round so a
neighbour's load on a shared machine spreads over all of them. CPU per request is the
worker's utime+stime over the run divided by the requests completed. Writes
bench/out/surfaces.json and the `surfaces` section of BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench import sections  # noqa: E402
from bench.run import Fake, Gateway, machine, run_loadgen  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "bench", "out")
MODEL = "fake:chunks-32-0"
# (title, path, body, marker, tokens): tokens is checked where each token appears once
SURFACES = {
    "chat": ("/v1/chat/completions", "/v1/chat/completions",
             {"model": MODEL, "stream": True, "messages": [{"role": "user", "content": "hi"}]}, "[DONE]", 32),
    "messages": ("/v1/messages (Anthropic)", "/v1/messages",
                 {"model": MODEL, "stream": True, "max_tokens": 64, "messages": [{"role": "user", "content": "hi"}]},
                 "message_stop", 32),
    # the .done events and response.completed repeat the text: no token count
    "responses": ("/v1/responses (OpenAI Responses)", "/v1/responses",
                  {"model": MODEL, "stream": True, "input": "hi", "store": False}, "response.completed", None),
}


def measure(gw, name, conc, duration):
    _, path, body, marker, tokens = SURFACES[name]
    c0 = gw.cpu()
    r = run_loadgen(gw.port, path, json.dumps(body), "", conc, duration, tokens, marker)
    c1 = gw.cpu()
    done = max(1, r["requests"])
    return {"requests": r["requests"], "errors": sum((r.get("errors") or {}).values()),
            "cpu_ms_per_req": (c1 - c0) * 1000 / done, "rps": r.get("rps")}


def render(res) -> str:
    m = res["machine"]
    lines = ["## API surfaces: gateway CPU per streamed request", "",
             f"`python -m bench.surfaces` ({res['date']}, {m['nproc']} cores, {m['cpu']}): one gevent "
             f"worker relaying the fake's 32-chunk stream, {res['conc']} connections, {res['rounds']} "
             f"round(s) of {res['duration']} s per surface, interleaved. The machine is shared: compare "
             "the rows with each other, not across runs; the minimum is the least disturbed round.", "",
             "| surface | requests | errors | req/s | worker CPU ms/request: median (min) of rounds | vs chat (median, min) |",
             "|---|---|---|---|---|---|"]
    base = res["surfaces"]["chat"]
    for name, s in res["surfaces"].items():
        lines.append(f"| {SURFACES[name][0]} | {s['requests']} | {s['errors']} | {s['rps']:.0f} | "
                     f"{s['cpu_ms_per_req']:.3f} ({s['cpu_ms_min']:.3f}) | "
                     f"{s['cpu_ms_per_req'] / base['cpu_ms_per_req']:.2f}×, {s['cpu_ms_min'] / base['cpu_ms_min']:.2f}× |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-md", action="store_true")
    ap.add_argument("--conc", type=int, default=16)
    args = ap.parse_args(argv)
    rounds, duration = (1, 2.0) if args.quick else (6, 2.0)
    os.makedirs(OUT, exist_ok=True)
    logdir = tempfile.mkdtemp(prefix="surfaces-", dir=OUT)
    fake = Fake(logdir)
    gw = Gateway(fake, logdir)
    try:
        for name in SURFACES:             # warm-up: imports, pooled connections
            measure(gw, name, 4, 0.5)
        runs = {name: [] for name in SURFACES}
        for _ in range(rounds):
            for name in SURFACES:
                runs[name].append(measure(gw, name, args.conc, duration))
    finally:
        gw.close()
        fake.close()
    res = {"date": datetime.date.today().isoformat(), "machine": machine(), "conc": args.conc,
           "rounds": rounds, "duration": duration, "surfaces": {}}
    for name, rs in runs.items():
        res["surfaces"][name] = {"requests": sum(r["requests"] for r in rs), "errors": sum(r["errors"] for r in rs),
                                 "rps": statistics.median(r["rps"] or 0 for r in rs),
                                 "cpu_ms_per_req": statistics.median(r["cpu_ms_per_req"] for r in rs),
                                 "cpu_ms_min": min(r["cpu_ms_per_req"] for r in rs)}
    with open(os.path.join(OUT, "surfaces.json"), "w") as fh:
        json.dump(res, fh, indent=1)
    text = render(res)
    print(text)
    if not args.no_md:
        sections.write_section("surfaces", text)


if __name__ == "__main__":
    main()
