"""Run a real Triton server on a CPU-only machine, serving the model repository unchanged.

    .venv/bin/python deploy/triton_cpu/launch.py --model-repository model_repository
    .venv/bin/python deploy/triton_cpu/launch.py --model-repository model_repository --wait-ready 120
    .venv/bin/python deploy/triton_cpu/launch.py stop

Triton itself (2.51) comes from the ``nvidia-pytriton`` wheel, which ships
``tritonserver``, the Python backend and the shared libraries they need. This script
assembles a backend directory under the workdir -- ``python/`` (the Python backend,
with the stub matching this interpreter's version) and ``onnxruntime/model.py`` (our
Python-based backend, so configs saying ``backend: "onnxruntime"`` load) -- sets up
the environment the stub needs, and starts ``tritonserver``.

Foreground (default): ``exec``s, so this process *is* tritonserver and SIGTERM stops
it cleanly. ``--wait-ready N``: starts it in the background, waits for
``/v2/health/ready``, prints pid and URLs, exits 0 (non-zero with the log tail if
Triton dies or is not ready in N seconds). ``stop`` sends SIGTERM to the pid in
``<workdir>/tritonserver.pid`` and waits for it to exit.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
SITE_PACKAGES = Path(sysconfig.get_paths()["purelib"])  # the venv running this script
WHEEL = SITE_PACKAGES / "pytriton" / "tritonserver"
PID_FILE = "tritonserver.pid"


def build_backend_dir(workdir: Path) -> Path:
    """``<workdir>/backends`` with ``python/`` from the wheel and our ``onnxruntime/``.

    Triton looks for a Python-based backend named X at ``<backend-dir>/X/model.py`` and
    for the Python backend's artifacts (libtriton_python.so, the stub, the utils) in
    ``<backend-dir>/python/``. Files are copied (not linked) so a running server is
    not affected by edits or a wheel upgrade.
    """
    pyver = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = WHEEL / "python_backend_stubs" / pyver / "triton_python_backend_stub"
    if not (WHEEL / "bin" / "tritonserver").exists() or not stub.exists():
        sys.exit(f"nvidia-pytriton (with a Python {pyver} stub) is not installed in {SITE_PACKAGES}: "
                 f"run .venv/bin/pip install --no-deps nvidia-pytriton==0.7.0")
    backends = workdir / "backends"
    python = backends / "python"
    ort = backends / "onnxruntime"
    python.mkdir(parents=True, exist_ok=True)
    ort.mkdir(parents=True, exist_ok=True)
    for name in ("libtriton_python.so", "triton_python_backend_utils.py"):
        _install(WHEEL / "backends" / "python" / name, python / name)
    _install(stub, python / "triton_python_backend_stub")
    _install(HERE / "backends" / "onnxruntime" / "model.py", ort / "model.py")
    return backends


def _install(src: Path, dst: Path) -> None:
    """Copy then rename: overwriting a stub that a stray process still runs fails (ETXTBSY)."""
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.copy2(src, tmp)
    os.replace(tmp, dst)


def server_env(args: argparse.Namespace) -> dict[str, str]:
    """The environment tritonserver and its Python stubs need."""
    env = dict(os.environ)
    if args.ort_threads is not None:  # read by model.py unless a config sets intra_op_thread_count
        env["GENSERVE_ORT_THREADS"] = str(args.ort_threads)
    libs = str(SITE_PACKAGES / "nvidia_pytriton.libs")
    env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [libs, env.get("LD_LIBRARY_PATH")]))
    # The stub's interpreter ignores PYTHONPATH/site-packages; model.py reads this.
    env["GENSERVE_TRITON_SITE_PACKAGES"] = str(SITE_PACKAGES)
    venv_bin = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join([venv_bin, env.get("PATH", "")])
    env.setdefault("VIRTUAL_ENV", str(Path(sys.prefix)))
    return env


def server_command(args: argparse.Namespace, backends: Path) -> list[str]:
    return [
        str(WHEEL / "bin" / "tritonserver"),
        f"--model-repository={Path(args.model_repository).resolve()}",
        f"--backend-directory={backends}",
        f"--http-address={args.address}", f"--http-port={args.http_port}",
        f"--grpc-address={args.address}", f"--grpc-port={args.grpc_port}",
        f"--metrics-address={args.address}", f"--metrics-port={args.metrics_port}",
        "--allow-metrics=true",
        "--allow-gpu-metrics=false",  # no GPU (and no DCGM) here
        "--allow-cpu-metrics=true",
        f"--log-verbose={args.log_verbose}",
        # Python-backend shared-memory regions live in /dev/shm under a fixed prefix;
        # two servers on one machine must not share it (segfaults or hangs otherwise).
        f"--backend-config=python,shm-region-prefix-name={shm_prefix(args)}",
        f"--exit-timeout-secs={args.exit_timeout}",
        *args.extra,
    ]


def shm_prefix(args: argparse.Namespace) -> str:
    return f"genserve_{args.http_port}_"


def sweep_shm(prefix: str) -> None:
    """Remove shared-memory regions a server killed mid-start-up left in /dev/shm."""
    for path in Path("/dev/shm").glob(f"{prefix}*"):
        path.unlink(missing_ok=True)


def log_tail(path: Path, chars: int = 3000) -> str:
    """Triton's error lines (model load failures scroll far up) and the log's end."""
    if not path.exists():
        return "(no log)"
    text = path.read_text(errors="replace")
    errors = [line[:600] for line in text.splitlines()
              if line[:1] == "E" and line[1:5].isdigit() and "CudaDriverHelper" not in line]
    return "errors:\n" + "\n".join(errors[-10:]) + "\n...\n" + text[-chars:]


def ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/v2/health/ready", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def serve(args: argparse.Namespace) -> int:
    workdir = Path(args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    repository = Path(args.model_repository)
    if not repository.is_dir():
        sys.exit(f"model repository {repository} does not exist (run `make model-repository`)")
    pid_file = workdir / PID_FILE
    if pid_file.exists() and is_tritonserver(int(pid_file.read_text().split()[0])):
        sys.exit(f"a tritonserver from {workdir} is running (pid {pid_file.read_text().split()[0]}): "
                 f"`{sys.argv[0]} stop --workdir {args.workdir}` first")
    command = server_command(args, build_backend_dir(workdir))
    env = server_env(args)
    host = "127.0.0.1" if args.address in ("0.0.0.0", "") else args.address

    if args.wait_ready is None:
        # Foreground: become tritonserver (same pid), so signals reach it directly.
        if args.log_file:
            log = os.open(args.log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            os.dup2(log, 1)
            os.dup2(log, 2)
        pid_file.write_text(f"{os.getpid()}\n{shm_prefix(args)}\n")
        os.execve(command[0], command, env)

    log_path = Path(args.log_file or workdir / "tritonserver.log")
    with open(log_path, "wb") as log:  # fresh log: the error tail below is this run's
        proc = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    pid_file.write_text(f"{proc.pid}\n{shm_prefix(args)}\n")
    http = f"http://{host}:{args.http_port}"
    started = time.monotonic()
    while time.monotonic() - started < args.wait_ready:
        if proc.poll() is not None:
            kill_group(proc.pid)  # stubs of a crashed server outlive it
            sweep_shm(shm_prefix(args))
            print(f"tritonserver exited with {proc.returncode}; log {log_path}:\n{log_tail(log_path)}",
                  file=sys.stderr)
            pid_file.unlink(missing_ok=True)
            return 1
        if ready(http):
            print(f"tritonserver ready in {time.monotonic() - started:.1f}s, pid {proc.pid}\n"
                  f"  HTTP    {http}\n  gRPC    {host}:{args.grpc_port}\n"
                  f"  metrics http://{host}:{args.metrics_port}/metrics\n"
                  f"  log     {log_path}\n  stop    {sys.argv[0]} stop --workdir {args.workdir}")
            return 0
        time.sleep(0.5)
    stop_pid(proc.pid, timeout=args.exit_timeout + 10)  # before printing: stderr may be a closed pipe
    sweep_shm(shm_prefix(args))
    pid_file.unlink(missing_ok=True)
    print(f"tritonserver not ready after {args.wait_ready}s; stopped it. Log {log_path}:\n"
          f"{log_tail(log_path)}", file=sys.stderr)
    return 1


def is_tritonserver(pid: int) -> bool:
    """Guard against a stale pid file whose pid now belongs to something else."""
    try:
        return b"tritonserver" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def stop_pid(pid: int, timeout: float) -> bool:
    """SIGTERM, wait up to `timeout`, then SIGKILL. True if it stopped on SIGTERM.

    Triton installs its SIGTERM handler only once the models are loaded: a SIGTERM
    during start-up kills it outright and can orphan Python-backend stubs, which
    ignore SIGTERM. So when the server leads its own process group (--wait-ready
    starts it in a new session), whatever is left of that group is SIGKILLed after.
    """
    try:
        leader = os.getpgid(pid) == pid
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return True
    clean = False
    deadline = time.monotonic() + timeout
    while not clean and time.monotonic() < deadline:
        try:  # reap it if it is our child, else just probe
            clean = os.waitpid(pid, os.WNOHANG)[0] == pid
        except ChildProcessError:
            clean = not is_tritonserver(pid)
        time.sleep(0 if clean else 0.2)
    if not clean:
        os.kill(pid, signal.SIGKILL)
    if leader:
        kill_group(pid)
    return clean


def kill_group(pgid: int) -> None:
    """SIGKILL what is left of a process group (its leader's pid is not reused while it lives)."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def stop(args: argparse.Namespace) -> int:
    pid_file = Path(args.workdir).resolve() / PID_FILE
    if not pid_file.exists():
        print(f"no {pid_file}: nothing to stop")
        return 0
    pid, prefix = (pid_file.read_text().split() + [""])[:2]
    pid = int(pid)
    if not is_tritonserver(pid):
        print(f"pid {pid} is not a running tritonserver; removing stale {pid_file}")
        pid_file.unlink()
        return 0
    clean = stop_pid(pid, args.timeout)
    if prefix:
        sweep_shm(prefix)
    pid_file.unlink(missing_ok=True)
    print(f"tritonserver {pid} {'stopped' if clean else 'did not stop in time: killed'}")
    return 0 if clean else 1


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["stop"]:
        parser = argparse.ArgumentParser(prog="launch.py stop", description="Stop a server started here.")
        parser.add_argument("--workdir", default=".triton")
        parser.add_argument("--timeout", type=float, default=40.0, help="seconds before SIGKILL")
        return stop(parser.parse_args(argv[1:]))

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-repository", required=True)
    parser.add_argument("--address", default="0.0.0.0", help="bind address for HTTP, gRPC and metrics")
    parser.add_argument("--http-port", type=int, default=8000)
    parser.add_argument("--grpc-port", type=int, default=8001)
    parser.add_argument("--metrics-port", type=int, default=8002)
    parser.add_argument("--workdir", default=".triton", help="backend dir, pid file, default log")
    parser.add_argument("--log-file", help="stdout+stderr of tritonserver (default: console in "
                                           "foreground, <workdir>/tritonserver.log with --wait-ready)")
    parser.add_argument("--log-verbose", type=int, default=0)
    parser.add_argument("--ort-threads", type=int, help="ONNX Runtime intra-op threads per model "
                                                          "instance (default: ORT decides, i.e. all cores)")
    parser.add_argument("--exit-timeout", type=int, default=30, help="Triton's --exit-timeout-secs")
    parser.add_argument("--wait-ready", type=float, metavar="SECONDS",
                        help="start in the background and wait until ready")
    parser.add_argument("extra", nargs="*", help="extra tritonserver flags, after --")
    return serve(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
