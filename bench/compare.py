"""Side by side: several bench/out/*.json results (e.g. A/B runs of snapshots).

    python -m bench.compare bench/out/ab-gw-base.json bench/out/ab-gw-step1.json ...
"""
from __future__ import annotations

import json
import os
import sys


def main(paths):
    runs = [(os.path.basename(p).replace(".json", ""), json.load(open(p))) for p in paths]
    keys = []
    for _, r in runs:
        for row in r["rows"]:
            k = (row["scenario"], row["target"], row["conc"])
            if k not in keys:
                keys.append(k)
    names = [n for n, _ in runs]
    print(f"{'scenario':9s} {'target':7s} {'c':>4s} | " + " | ".join(f"{n[:22]:>22s}" for n in names))
    print(f"{'':9s} {'':7s} {'':>4s} | " + " | ".join(f"{'rps  p50ms  cpu/req':>22s}" for _ in names))
    for k in keys:
        cells = []
        for _, r in runs:
            row = next((x for x in r["rows"] if (x["scenario"], x["target"], x["conc"]) == k), None)
            if row is None:
                cells.append(f"{'-':>22s}")
            else:
                cpu = row["cpu_ms_per_req"]
                cells.append(f"{row['rps']:7.0f} {row['p50_ms']:7.1f} {cpu if cpu is not None else '-':>6}")
        print(f"{k[0]:9s} {k[1]:7s} {k[2]:4d} | " + " | ".join(cells))


if __name__ == "__main__":
    main(sys.argv[1:])
