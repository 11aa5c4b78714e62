"""Where the time of a profiled JAX run goes: the busiest ops of a `jax.profiler` perfetto trace.

    python benchmarks/trace_summary.py TRACE_DIR [--top 25] [--steps N]

`jax.profiler.trace(dir, create_perfetto_trace=True)` writes `dir/plugins/profile/<run>/perfetto_trace.json.gz`.
Complete events ('X') are summed by (thread, name) over the device processes (`/device:GPU:0`, ...; on CPU,
where there are none, the XLA threads of `/host:CPU`). Threads are kept apart because a GPU trace has several
views of the same work (kernels on the streams, and XLA ops / modules lines): compare rows of one thread.
"""
from __future__ import annotations

import argparse
import collections
import gzip
import json
import pathlib
import sys


def find_trace(trace_dir: str | pathlib.Path) -> pathlib.Path:
  """The newest perfetto trace under `trace_dir`."""
  traces = sorted(pathlib.Path(trace_dir).glob("**/perfetto_trace.json.gz"), key=lambda p: p.stat().st_mtime)
  if not traces:
    raise FileNotFoundError(f"no perfetto_trace.json.gz under {trace_dir}")
  return traces[-1]


def summarize(trace_dir: str | pathlib.Path, top: int = 25, steps: int = 1) -> list[dict]:
  """The `top` (thread, op) rows by total duration: [{thread, op, ms_per_step, count, share}], share = fraction
  of that thread's summed event time."""
  with gzip.open(find_trace(trace_dir), "rt") as f:
    data = json.load(f)
  events = data["traceEvents"] if isinstance(data, dict) else data
  procs = {e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}
  threads = {(e["pid"], e["tid"]): e["args"]["name"] for e in events
             if e.get("ph") == "M" and e.get("name") == "thread_name"}
  device = {pid for pid, name in procs.items() if name.startswith("/device:")}
  if device:
    keep = lambda pid, tid: pid in device
  else:  # CPU: the XLA executor threads
    keep = lambda pid, tid: threads.get((pid, tid), "").startswith("tf_XLA")
  total, count, per_thread = collections.Counter(), collections.Counter(), collections.Counter()
  for e in events:
    if e.get("ph") != "X" or not keep(e.get("pid"), e.get("tid")):
      continue
    thread = f"{procs.get(e['pid'], e['pid'])} {threads.get((e['pid'], e['tid']), e['tid'])}"
    key = (thread, e.get("name", "?"))
    total[key] += float(e.get("dur", 0.0))
    count[key] += 1
    per_thread[thread] += float(e.get("dur", 0.0))
  return [{"thread": t, "op": op, "ms_per_step": us / 1e3 / steps, "count": count[(t, op)] / steps,
           "share": us / per_thread[t] if per_thread[t] else 0.0}
          for (t, op), us in total.most_common(top)]


def render(rows: list[dict], title: str = "") -> str:
  header = ["| thread | op | ms/step | calls/step | share of thread |", "|---|---|---|---|---|"]
  lines = ([title] if title else []) + header
  for r in rows:
    op = r["op"] if len(r["op"]) <= 80 else r["op"][:77] + "..."
    lines.append(f"| {r['thread']} | `{op}` | {r['ms_per_step']:.3f} | {r['count']:g} | {100 * r['share']:.1f}% |")
  return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("trace_dir")
  parser.add_argument("--top", type=int, default=25)
  parser.add_argument("--steps", type=int, default=1, help="profiled steps (ms and calls are per step)")
  args = parser.parse_args(argv)
  print(render(summarize(args.trace_dir, args.top, args.steps)))
  return 0


if __name__ == "__main__":
  sys.exit(main())
