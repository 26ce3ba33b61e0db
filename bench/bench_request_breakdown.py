"""Where one txt2img request's time goes: end-to-end latency beside the model executions.

    .venv/bin/python bench/bench_request_breakdown.py --steps 20 --repeats 10

Starts the service on model_repository/ (embedded backend), sends warm-ups, then
`repeats` rounds of sequential 32x32 txt2img requests. Each round sends one request per
client mode, alternating which goes first:
  keep-alive  one httpx.Client for the whole run (connection reused, as SDKs and load
              generators do)
  new client  `httpx.post` per request: a new client, TCP connection and (unused) TLS
              context each time — what this benchmark measured before 2026-11-23
With `--baseline DIR` (a checkout of another revision, e.g. `git worktree add /tmp/base
HEAD~3`) that code is served too, on the same model repository, and the rounds alternate
between the two servers as well: before/after in one run. For each request it reads the
client-side latency, the response's total_seconds (the
handler's time), and the increase of genserve_model_execution_seconds_sum (every model
call the request made) from /metrics. The HTTP layer outside the handler is client −
server total; the handler's own non-model time is server total − models. Appends the
per-request table and a median summary, with the command and the load average, to
bench/results/request_breakdown.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.report import append_report  # noqa: E402
from tests.fixtures.local_server import LocalServer  # noqa: E402

MODES = ("keep-alive", "new client")


def execution_seconds(client: httpx.Client, url: str) -> dict[str, float]:
    out = {}
    for line in client.get(f"{url}/metrics").text.splitlines():
        if line.startswith("genserve_model_execution_seconds_sum{"):
            model = line.split('model="', 1)[1].split('"', 1)[0]
            out[model] = float(line.rsplit(" ", 1)[1])
    return out


def load_average() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=10, help="rounds (one request per client mode each)")
    parser.add_argument("--baseline", type=Path, default=None,
                        help="a checkout of other code to serve beside this one, requests alternating")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "request_breakdown.md")
    args = parser.parse_args()

    roots = {"this": ROOT, **({"baseline": args.baseline.resolve()} if args.baseline else {})}
    env = {"GENSERVE_MODEL_REPOSITORY": str(ROOT / "model_repository")}
    servers = {code: LocalServer(env, Path(f"/tmp/genserve-bench-breakdown-{code}.log"), root=root)
               for code, root in roots.items()}
    cases = [(code, mode) for code in servers for mode in MODES]
    rows = []  # (code, mode, client latency s, server total s, models s)
    load_before = load_after = ""
    try:
        for server in servers.values():
            server.wait_ready()
        body = {"prompt": "a handwritten digit five", "num_inference_steps": args.steps, "guidance_scale": 5.0}
        clients = {code: httpx.Client(timeout=120) for code in servers}
        with httpx.Client(timeout=30) as metrics_client:
            for code, server in servers.items():  # warm-up, both modes
                for seed in range(3):
                    clients[code].post(f"{server.url}/v1/txt2img", json={**body, "seed": seed}).raise_for_status()
                httpx.post(f"{server.url}/v1/txt2img", json={**body, "seed": 0}, timeout=120).raise_for_status()
            load_before = load_average()
            for round_ in range(args.repeats):
                for i, (code, mode) in enumerate(cases if round_ % 2 == 0 else cases[::-1]):
                    seed = 1 + round_ * len(cases) + i
                    url = servers[code].url
                    before = execution_seconds(metrics_client, url)
                    t0 = time.perf_counter()
                    if mode == "keep-alive":
                        r = clients[code].post(f"{url}/v1/txt2img", json={**body, "seed": seed})
                    else:
                        r = httpx.post(f"{url}/v1/txt2img", json={**body, "seed": seed}, timeout=120)
                    r.raise_for_status()
                    total = r.json()["timings"]["total_seconds"]
                    latency = time.perf_counter() - t0
                    after = execution_seconds(metrics_client, url)
                    models = sum(after[m] - before.get(m, 0.0) for m in after if m.startswith("sd_digits"))
                    rows.append((code, mode, latency, total, models))
            load_after = load_average()
        for client in clients.values():
            client.close()
    finally:
        for server in servers.values():
            server.stop()

    lines = [f"## {time.strftime('%Y-%m-%d %H:%M')}", "", f"`{' '.join([Path(sys.executable).name, *sys.argv])}`", "",
             f"32x32 txt2img, {args.steps} steps, guidance 5 (one text-encoder call, {args.steps} U-Net calls "
             "of 2 rows, one VAE decode), embedded backend, requests one after another, "
             + ("this code and the baseline (" + str(args.baseline) + ") alternating, " if args.baseline else "")
             + f"the two client modes alternating; load average {load_before} before, {load_after} after", "",
             "| code | client | client latency ms | server total ms | sum of model executions ms | client / models "
             "| client − server ms | server − models ms |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for code, mode in cases:
        mine = [r[2:] for r in rows if r[:2] == (code, mode)]
        latency, total, models = (statistics.median(r[i] for r in mine) for i in range(3))
        ratio = statistics.median(r[0] / r[2] for r in mine)
        gap_http = statistics.median(r[0] - r[1] for r in mine)
        gap_handler = statistics.median(r[1] - r[2] for r in mine)
        lines.append(f"| {code} | {mode} (median of {len(mine)}) | {1000 * latency:.1f} | {1000 * total:.1f} | "
                     f"{1000 * models:.1f} | {ratio:.2f} | {1000 * gap_http:.1f} | {1000 * gap_handler:.1f} |")
    lines += ["", "Each request:", "", "| # | code | client | client latency ms | server total ms "
              "| sum of model executions ms | client / models |", "|---:|---|---|---:|---:|---:|---:|"]
    for i, (code, mode, latency, total, models) in enumerate(rows, 1):
        lines.append(f"| {i} | {code} | {mode} | {1000 * latency:.1f} | {1000 * total:.1f} | {1000 * models:.1f} | "
                     f"{latency / models:.2f} |")
    append_report(args.out, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
