"""Environment and helpers shared by the tests that run in subprocesses (several CPU devices, several processes)."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# One XLA compilation cache for every such subprocess of the session: the runs compile the same programs again
# and again, and reading them back instead of recompiling halves each run on 2 CPU cores. It changes no
# result: a cached executable is the one the compiler produced. Filled by conftest's session fixture.
CACHE_ENV: dict[str, str] = {}


def subprocess_env(devices: int, **extra: str) -> dict[str, str]:
    """A child's environment: `devices` CPU devices (the flag works only before jax starts), this checkout first
    on the path, and the session's compilation cache."""
    return {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", "JAX_PLATFORMS": "cpu",
            "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]), **CACHE_ENV, **extra}


def run_python(code: str, *args: str, devices: int = 8, timeout: int = 240, env: dict | None = None):
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=timeout,
                          env=subprocess_env(devices, **(env or {})), cwd=ROOT)


def last_json(proc) -> dict:
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_processes(argvs: list[list[str]], devices: int, timeout: int = 240) -> list[str]:
    """Starts one process per argv at once (they join each other through jax.distributed) and returns each one's
    stdout; every process must exit 0, and none is left running."""
    procs = [subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=subprocess_env(devices), cwd=ROOT) for argv in argvs]
    outs = []
    try:
        for p in procs:
            stdout, stderr = p.communicate(timeout=timeout)
            assert p.returncode == 0, stderr[-3000:]
            outs.append(stdout)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return outs
