"""Chaos run: locust against a genserve on the Triton backend while Triton goes away twice
— a graceful stop (SIGTERM) and a kill (SIGKILL) — and comes back on the same ports.

    .venv/bin/python loadtests/chaos.py --users 16 --duration 60

Starts its own tritonserver (deploy/triton_cpu) and service on loopback, stops both after.
Passes (exit 0) when:
  - every locust request got a definite answer: 200, or 429/503 with Retry-After; no 500,
    no other status, none without an answer past its deadline (client timeout);
  - "witness" diffusion requests sent just before each outage, with deadlines that outlast
    it, finish with 200 and the same image bytes as the same request before the chaos
    (their trajectories wait in the service and resume; nothing is recomputed);
  - afterwards the service is ready and serves again without a restart.
Reports (locust CSV/HTML, both servers' logs) go to --reports (default loadtests/reports).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402

from loadtests.run import read_figures, run_locust  # noqa: E402
from tests.fixtures.local_server import LocalServer  # noqa: E402
from tests.fixtures.triton import TritonProcess  # noqa: E402

WITNESS = {"prompt": "a handwritten digit four", "num_inference_steps": 150, "num_images": 2,
           "guidance_scale": 4.0, "scheduler": "euler_ancestral", "timeout_s": 240}


class Timeline:
    """Triton's outages, in order, with what happened when (for the report)."""

    def __init__(self, triton: TritonProcess, repository: Path, workdir: Path):
        self.triton, self.repository, self.workdir = triton, repository, workdir
        self.events: list[str] = []
        self.t0 = time.monotonic()

    def note(self, what: str) -> None:
        self.events.append(f"{time.monotonic() - self.t0:6.1f}s {what}")
        print(self.events[-1], flush=True)

    def outage(self, how: str, down_s: float) -> None:
        ports = self.triton.ports
        if how == "stop":
            self.note("triton: SIGTERM (graceful stop)")
            self.triton.proc.send_signal(signal.SIGTERM)
            self.triton.proc.wait(timeout=60)
        else:
            self.note("triton: SIGKILL")
            os.killpg(self.triton.proc.pid, signal.SIGKILL)
            self.triton.proc.wait()
        self.note(f"triton: down (exit {self.triton.proc.returncode}); restarting in {down_s:.0f}s")
        time.sleep(down_s)
        workdir = self.workdir / f"triton-{len(self.events)}"
        workdir.mkdir(parents=True, exist_ok=True)
        self.triton = TritonProcess(self.repository, workdir, ports)
        self.note(f"triton: ready again after {self.triton.wait_ready():.1f}s")


def send_witnesses(url: str, seeds: list[int], out: dict, started: list[threading.Event] | None = None):
    """Witness requests over the stream endpoint: their progress events say when each
    witness is part-way (then its event in `started` is set; the outage begins once all
    are); the result event is the txt2img response, compared with the one before the chaos."""
    import json

    def read(seed, r):
        if r.status_code != 200:
            r.read()
            out[seed] = f"HTTP {r.status_code}: {r.text[:200]}"
            return
        event = None
        for line in r.iter_lines():
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: "):
                data = json.loads(line[6:])
                if event == "progress" and data["step"] >= 5 and started is not None:
                    started[seeds.index(seed)].set()
                elif event in ("result", "error"):
                    out[seed] = (event, data)

    def one(seed):
        # As a client does, a 429/503 is retried after its Retry-After (for up to 60 s): right
        # after Triton is back the service may still answer 503 until its next call finds it up.
        give_up = time.monotonic() + 60
        try:
            while True:
                with httpx.stream("POST", f"{url}/v1/txt2img/stream", json=dict(WITNESS, seed=seed),
                                  timeout=WITNESS["timeout_s"] + 30) as r:
                    if r.status_code not in (429, 503) or time.monotonic() > give_up:
                        return read(seed, r)
                    r.read()
                    wait = float(r.headers.get("retry-after", "1"))
                time.sleep(wait)
        except Exception as exc:  # reported as a failed witness
            out[seed] = exc
    threads = [threading.Thread(target=one, args=(s,)) for s in seeds]
    for t in threads:
        t.start()
    return threads


def images(answer) -> list[str] | None:
    """The images of a witness's result event, None for anything else."""
    if isinstance(answer, tuple) and answer[0] == "result":
        return [im["data"] for im in answer[1]["images"]]
    return None


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--users", type=int, default=16, help="simulated users (default 16: about twice the "
                   "demo's capacity on 2 cores)")
    p.add_argument("--spawn-rate", type=float, default=8.0)
    p.add_argument("--duration", type=int, default=60, help="seconds of load (default 60)")
    p.add_argument("--down-s", type=float, default=5.0, help="seconds Triton stays down each time (default 5)")
    p.add_argument("--repository", type=Path, default=Path(os.environ.get("GENSERVE_MODEL_REPOSITORY",
                                                                          ROOT / "model_repository")))
    p.add_argument("--reports", type=Path, default=HERE / "reports")
    p.add_argument("user_classes", nargs="*", metavar="USER_CLASS")
    args = p.parse_args(argv)
    if not 20 <= args.duration <= 600:
        p.error("--duration must be within 20..600 seconds")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    prefix = args.reports / ("chaos-" + time.strftime("%Y%m%d-%H%M%S"))
    workdir = Path(f"{prefix}_work")
    workdir.mkdir(parents=True, exist_ok=True)
    triton = TritonProcess(args.repository.resolve(), workdir)
    service = None
    problems: list[str] = []
    try:
        triton.wait_ready()
        service = LocalServer({"GENSERVE_BACKEND": "triton", "GENSERVE_MODEL_REPOSITORY": str(args.repository),
                               "GENSERVE_TRITON_URL": f"127.0.0.1:{triton.grpc_port}",
                               "GENSERVE_TRITON_TIMEOUT_S": "10"}, Path(f"{prefix}_service.log"))
        service.wait_ready()
        url = service.url
        # 1. References: the witnesses' images with Triton healthy.
        reference = {}
        for t in send_witnesses(url, [11, 12, 21, 22], reference):
            t.join()
        for seed, r in reference.items():
            if images(r) is None:
                raise RuntimeError(f"reference witness {seed} failed: {r!r}")

        # 2. Load, with two outages in the middle; witnesses go in just before each.
        timeline = Timeline(triton, args.repository.resolve(), workdir)
        witnesses: dict = {}
        threads: list[threading.Thread] = []

        def chaos():
            for seeds, how, at in (([11, 12], "stop", 0.25), ([21, 22], "kill", 0.6)):
                time.sleep(max(0.0, timeline.t0 + at * args.duration - time.monotonic()))
                started = [threading.Event() for _ in seeds]
                threads.extend(send_witnesses(url, seeds, witnesses, started))
                deadline = time.monotonic() + 60
                if not all(e.wait(timeout=max(0.0, deadline - time.monotonic())) for e in started):
                    timeline.note("witnesses did not all start within 60 s")
                timeline.note(f"witnesses {seeds} part-way")
                timeline.outage(how, args.down_s)
        os.environ["LOADTEST_ACCEPT"] = "429,503"
        os.environ["LOADTEST_TIMEOUT_S"] = "150"  # past the default deadline (120 s) + margin: a hang
        chaos_thread = threading.Thread(target=chaos)
        chaos_thread.start()
        locust_args = argparse.Namespace(users=args.users, spawn_rate=args.spawn_rate, duration=args.duration,
                                         user_classes=args.user_classes)
        code = run_locust(url, locust_args, prefix)
        chaos_thread.join()
        triton = timeline.triton
        for t in threads:
            t.join()

        # 3. Verdicts.
        stats = Path(f"{prefix}_stats.csv")
        if code not in (0, 1) or not stats.exists():
            problems.append(f"locust failed (exit {code})")
        else:
            figures, rows = read_figures(stats)
            print(f"\nlocust: {figures.requests} requests, {figures.failures} without a definite answer, "
                  f"{figures.rps:.2f} req/s")
            for r in rows:
                print(f"  {r['Type']} {r['Name']}: {r['Request Count']} requests, {r['Failure Count']} failed")
            if figures.failures:
                problems.append(f"{figures.failures} requests got no definite answer (see {prefix}_failures.csv)")
        for seed, r in sorted(witnesses.items()):
            if images(r) is None:
                problems.append(f"witness {seed}: no result: {str(r)[:300]}")
            elif images(r) != images(reference[seed]):
                problems.append(f"witness {seed}: a result, but its images differ from the run without an outage")
            else:
                print(f"witness {seed}: result with the same images as without the outage "
                      f"({r[1]['timings']['total_seconds']:.1f}s in all, "
                      f"{r[1]['timings']['denoising_seconds']:.1f}s of it denoising)")
        deadline = time.monotonic() + 30
        while httpx.get(f"{url}/readyz").status_code != 200:
            if time.monotonic() > deadline:
                problems.append("the service was not ready 30 s after Triton came back")
                break
            time.sleep(0.5)
        after = httpx.post(f"{url}/v1/gan/generate", json={"seed": 1}, timeout=30)
        if after.status_code != 200:
            problems.append(f"after the chaos, a GAN request got {after.status_code}")
        print("\n".join(["timeline:", *timeline.events]))
    finally:
        if service is not None:
            service.stop()
        triton.kill()
    for p in problems:
        print(f"FAIL: {p}", file=sys.stderr)
    if not problems:
        print("PASS: every request answered 200/429/503, witnesses resumed to the same images, no restart needed")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
