"""Summarise py-spy's raw (collapsed) stacks: self and inclusive sample share per function.

    python -m bench.stacks bench/out/profile-v1.txt [--top 30] [--grep gateway]
"""
from __future__ import annotations

import argparse
import re
from collections import Counter

_LINE = re.compile(r"^(.*) (\d+)$")


def frame_name(frame: str) -> str:
    # "func (path/to/file.py:123)" -> "func (file.py)"
    m = re.match(r"^(.*?) \((.*?)(?::\d+)?\)$", frame.strip())
    if not m:
        return frame.strip()
    fn, path = m.group(1), m.group(2)
    parts = path.split("/")
    short = "/".join(parts[-2:]) if len(parts) > 1 else path
    return f"{fn} ({short})"


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("file")
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("--grep", default="")
    args = ap.parse_args(argv)
    self_c, incl_c, total = Counter(), Counter(), 0
    with open(args.file) as fh:
        for line in fh:
            m = _LINE.match(line.rstrip("\n"))
            if not m:
                continue
            stack, n = m.group(1), int(m.group(2))
            frames = [frame_name(f) for f in stack.split(";") if f]
            # drop the process/thread label py-spy puts first
            frames = [f for f in frames if not f.startswith("process ") and not f.startswith("thread ")]
            if not frames:
                continue
            total += n
            self_c[frames[-1]] += n
            for f in set(frames):
                incl_c[f] += n
    print(f"{total} samples")
    for title, c in (("self", self_c), ("inclusive", incl_c)):
        print(f"--- top {args.top} by {title} ---")
        shown = 0
        for f, n in c.most_common():
            if args.grep and args.grep not in f:
                continue
            print(f"{100.0 * n / total:6.2f}%  {f}")
            shown += 1
            if shown >= args.top:
                break


if __name__ == "__main__":
    main()
