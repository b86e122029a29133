"""Run a worker script as the ranks of a local torch.distributed job (gloo, CPU).

The workers read torch.distributed's env:// variables (RANK, WORLD_SIZE, MASTER_ADDR,
MASTER_PORT). The free port is picked before the ranks bind it, so another process can
take it in between: a job whose ranks fail to start gets one retry on a new port.
Results are never retried: workers write them to files the test compares.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_once(worker: Path, world: int, args: list[str], timeout: float) -> tuple[bool, str]:
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()),
           "WORLD_SIZE": str(world), "OMP_NUM_THREADS": "1"}
    ranks = [subprocess.Popen([sys.executable, str(worker), *args],
                              env={**env, "RANK": str(rank)}, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for rank in range(world)]
    try:
        logs = [p.communicate(timeout=timeout)[0] for p in ranks]
    except subprocess.TimeoutExpired:
        logs = [f"timed out after {timeout} s"]
    finally:
        for p in ranks:
            if p.poll() is None:
                p.kill()
                p.communicate()
    return all(p.returncode == 0 for p in ranks), "\n".join(logs)


def run_ranks(worker: Path, world: int, args: list[str], timeout: float = 240) -> str:
    """Run ``world`` ranks of ``worker`` with ``args``; assert they all succeed (one retry
    on a new port); returns their logs."""
    ok, logs = _run_once(worker, world, args, timeout)
    if not ok:
        ok, retry_logs = _run_once(worker, world, args, timeout)
        logs = f"first attempt:\n{logs}\nretry:\n{retry_logs}"
    assert ok, logs
    return logs
