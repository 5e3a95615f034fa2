"""Scale-out costs (issue: shared state in Redis, usage in PostgreSQL); writes the
"scale-out" section of BENCHMARKS.md.

    .venv/bin/python -m bench.scaleout                 # all three parts
    .venv/bin/python -m bench.scaleout --parts usage   # only /api/usage over 1M PostgreSQL rows

- redis:   the gateway with server.redis (GATEWAY_REDIS_URL) against the same gateway with
           per-process state, same fake upstream, same layout as bench.run (gateway on core
           0, fake and load on core 1): added worker CPU per streamed request, c=1 p50, and
           c=256 10 ms streams against DIRECT.
- workers: two gunicorn workers (both cores) against one, remote only: non-streamed rps.
- usage:   GET /api/usage?since=<a day ago>&group_by=model over 1,000,000 rows in
           PostgreSQL (GATEWAY_BENCH_DATABASE_URL, default postgresql://127.0.0.1:5432/test,
           in a schema of its own that is dropped afterwards), through PgUsageLog.summary.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench import run, sections  # noqa: E402

REDIS_URL = os.environ.get("GATEWAY_BENCH_REDIS_URL") or "redis://127.0.0.1:6379/0"
DATABASE_URL = os.environ.get("GATEWAY_BENCH_DATABASE_URL") or "postgresql://127.0.0.1:5432/test"


class Args:
    def __init__(self, duration, ttft_duration):
        self.duration, self.ttft_duration, self.wrk = duration, ttft_duration, shutil.which("wrk") is not None


def redis_vs_local(args, log) -> dict:
    logdir = tempfile.mkdtemp(prefix="bench-scaleout-", dir=run.OUT)
    fake = run.Fake(logdir)
    out = {}
    margs = Args(args.duration, 0.0)
    try:
        direct = {(sc, c): run.measure(None, fake, "direct", sc, c, margs, log)
                  for sc, c in (("stream0", 1), ("stream10", 256))}
        for mode, env in (("local", {}), ("redis", {"GATEWAY_REDIS_URL": REDIS_URL,
                                                    "GATEWAY_REDIS_PREFIX": f"bench-{uuid.uuid4().hex[:8]}:"})):
            gw = run.Gateway(fake, logdir, extra_env=env)
            try:
                run.run_loadgen(gw.port, "/v1/chat/completions", run.body_for("v1", "stream0", "fake:"), "", 16, 1.0)
                rows = {}
                for sc, c in (("stream0", 1), ("stream0", 64), ("stream10", 256)):
                    rows[f"{sc}-c{c}"] = run.measure(gw, fake, "v1", sc, c, margs, log)
                out[mode] = rows
            finally:
                gw.close()
        out["direct"] = {f"{sc}-c{c}": row for (sc, c), row in direct.items()}
    finally:
        fake.close()
        shutil.rmtree(logdir, ignore_errors=True)
    return out


def workers(args, log) -> dict:
    logdir = tempfile.mkdtemp(prefix="bench-workers-", dir=run.OUT)
    fake = run.Fake(logdir)
    out = {}
    margs = Args(args.duration, 0.0)
    try:
        for n in (1, 2):
            gw = run.Gateway(fake, logdir, workers=n)
            try:
                if n == 2:   # both cores for the gateway's workers (the load shares core 1)
                    for pid in run.tree(gw.proc.pid):
                        subprocess.run(["taskset", "-a", "-p", "-c", "0,1", str(pid)], capture_output=True)
                row = run.measure(gw, fake, "v1", "nonstream", 64, margs, log)
                out[f"workers{n}"] = {"rps": row["rps"], "p50_ms": row["p50_ms"], "errors": row["error_count"]}
            finally:
                gw.close()
    finally:
        fake.close()
        shutil.rmtree(logdir, ignore_errors=True)
    return out


def usage_pg(args, log) -> dict:
    import psycopg

    from gateway.ops.usage_pg import PgUsageLog
    schema = f"bench_usage_{uuid.uuid4().hex[:8]}"
    admin = psycopg.connect(DATABASE_URL, autocommit=True)
    admin.execute(f'CREATE SCHEMA "{schema}"')
    url = f"{DATABASE_URL}{'&' if '?' in DATABASE_URL else '?'}options=-csearch_path%3D{schema}"
    spool = tempfile.mkdtemp(prefix="bench-spool-")
    usage = PgUsageLog(url, spool_dir=spool)
    try:
        usage.summary()   # creates the table and indexes, as the gateway does on first use
        now = time.time()
        t0 = time.perf_counter()
        with psycopg.connect(url, autocommit=True) as conn:
            # a day and a half of traffic: 1M rows, 20 models, 4 providers, 50 clients
            conn.execute("""
                INSERT INTO usage (ts, client_key, route, provider, model, key_index, status, stream,
                                   prompt_tokens, completion_tokens, latency_ms, ttft_ms)
                SELECT %s - (i %% 129600) - random(), 'client-' || (i %% 50), '/v1/chat/completions',
                       'p' || (i %% 4), 'p' || (i %% 4) || ':model-' || (i %% 20), i %% 3,
                       CASE WHEN i %% 97 = 0 THEN 429 ELSE 200 END, i %% 2,
                       50 + i %% 200, 20 + i %% 300, 100 + (i %% 1000), 20 + (i %% 100)
                FROM generate_series(1, %s) AS i""", (now, args.rows))
            conn.execute("ANALYZE usage")
            n = conn.execute("SELECT COUNT(*) FROM usage").fetchone()[0]
        load_s = time.perf_counter() - t0
        log(f"  {n} rows loaded in {load_s:.1f} s")
        since = now - 86400
        times, answer = [], None
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            answer = usage.summary(since, "model")
            times.append(time.perf_counter() - t0)
        whole = []
        for _ in range(max(1, args.repeat // 2)):
            t0 = time.perf_counter()
            usage.summary(None, "client")
            whole.append(time.perf_counter() - t0)
        log(f"  group_by=model since a day ago: median {statistics.median(times) * 1000:.0f} ms "
            f"(min {min(times) * 1000:.0f}, max {max(times) * 1000:.0f}) over {answer['total']['requests']} rows; "
            f"group_by=client, all rows: median {statistics.median(whole) * 1000:.0f} ms")
        return {"rows": n, "load_s": round(load_s, 1), "day_rows": answer["total"]["requests"],
                "groups": len(answer["groups"]), "model_day_ms": [round(t * 1000, 1) for t in times],
                "client_all_ms": [round(t * 1000, 1) for t in whole],
                "server_version": admin.info.server_version}
    finally:
        usage.close()
        admin.execute(f'DROP SCHEMA "{schema}" CASCADE')
        admin.close()
        shutil.rmtree(spool, ignore_errors=True)


def render(res: dict, note: str) -> str:
    a = []
    a.append("## Scale-out: Redis shared state, PostgreSQL usage (`python -m bench.scaleout`)")
    a.append("")
    if note:
        a.append(note)
        a.append("")
    r = res.get("redis")
    if r:
        a.append("| /v1 stream | local state: cpu/req, p50, rps | Redis: cpu/req, p50, rps | added cpu/req | DIRECT rps |")
        a.append("|---|---|---|---|---|")
        for cell in r["local"]:
            lo, re_ = r["local"][cell], r["redis"][cell]
            d = r["direct"].get(cell, {})
            a.append(f"| {cell} | {lo['cpu_ms_per_req']} ms, {lo['p50_ms']:.2f} ms, {lo['rps']} | "
                     f"{re_['cpu_ms_per_req']} ms, {re_['p50_ms']:.2f} ms, {re_['rps']} | "
                     f"{re_['cpu_ms_per_req'] - lo['cpu_ms_per_req']:+.3f} ms | {d.get('rps', '')} |")
        a.append("")
    w = res.get("workers")
    if w:
        a.append(f"Non-streamed /v1, c=64: one worker {w['workers1']['rps']} rps, two workers "
                 f"{w['workers2']['rps']} rps.")
        a.append("")
    u = res.get("usage")
    if u:
        med = statistics.median(u["model_day_ms"])
        a.append(f"`/api/usage?since=<a day ago>&group_by=model` over {u['rows']:,} rows in PostgreSQL "
                 f"{u['server_version'] // 10000} ({u['day_rows']:,} rows in the day, {u['groups']} models): "
                 f"median **{med:.0f} ms** (runs: {', '.join(f'{t:.0f}' for t in u['model_day_ms'])} ms; goal < 1 s). "
                 f"`group_by=client` over all rows: median {statistics.median(u['client_all_ms']):.0f} ms.")
        a.append("")
    return "\n".join(a)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--parts", default="redis,workers,usage")
    ap.add_argument("--duration", type=float, default=5.0)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--note", default="", help="a line for BENCHMARKS.md (e.g. what else ran on the box)")
    ap.add_argument("--no-md", action="store_true")
    args = ap.parse_args(argv)
    os.makedirs(run.OUT, exist_ok=True)
    run.raise_nofile()

    def log(msg):
        print(msg, flush=True)
    parts = [p for p in args.parts.split(",") if p]
    res = {}
    if "redis" in parts:
        log("Redis shared state vs per-process state")
        res["redis"] = redis_vs_local(args, log)
    if "workers" in parts:
        log("two workers vs one (non-streamed)")
        res["workers"] = workers(args, log)
    if "usage" in parts:
        log(f"/api/usage over {args.rows:,} PostgreSQL rows")
        res["usage"] = usage_pg(args, log)
    if not args.no_md:
        sections.write_section("scale-out", render(res, args.note))
        log("wrote the scale-out section of BENCHMARKS.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
