"""2-process DDP (gloo, CPU) with mmattn modules = one process on the whole batch."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import ddp_worker
import torch

WORKER = Path(__file__).resolve().parent / "ddp_worker.py"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_ranks(out: Path) -> tuple[bool, str]:
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()),
           "WORLD_SIZE": "2", "OMP_NUM_THREADS": "1"}
    ranks = [subprocess.Popen([sys.executable, str(WORKER), str(out)],
                              env={**env, "RANK": str(rank)}, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for rank in range(2)]
    try:
        logs = [p.communicate(timeout=120)[0] for p in ranks]
    finally:
        for p in ranks:
            if p.poll() is None:
                p.kill()
    return all(p.returncode == 0 for p in ranks), "\n".join(logs)


def test_ddp_gradients_match_single_process(tmp_path: Path) -> None:
    out = tmp_path / "grads.pt"
    # The free port is picked before the ranks bind it, so another process can take
    # it in between: a rank that fails to start gets one retry on a new port. A
    # gradient mismatch is never retried.
    ok, logs = _run_ranks(out)
    if not ok:
        ok, retry_logs = _run_ranks(out)
        logs = f"first attempt:\n{logs}\nretry:\n{retry_logs}"
    assert ok, logs
    ddp_grads = torch.load(out)

    model, (text, image, labels) = ddp_worker.build()
    ddp_worker.loss_of(model, text, image, labels).backward()
    assert set(ddp_grads) == {name for name, _ in model.named_parameters()}
    for name, p in model.named_parameters():
        torch.testing.assert_close(ddp_grads[name], p.grad, rtol=1e-5, atol=1e-6, msg=name)
