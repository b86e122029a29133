"""2-process DDP (gloo, CPU) with mmattn modules = one process on the whole batch."""

from __future__ import annotations

from pathlib import Path

import ddp_worker
import torch
from spawn import run_ranks

WORKER = Path(__file__).resolve().parent / "ddp_worker.py"


def test_ddp_gradients_match_single_process(tmp_path: Path) -> None:
    out = tmp_path / "grads.pt"
    run_ranks(WORKER, 2, [str(out)])
    ddp_grads = torch.load(out)

    model, (text, image, labels) = ddp_worker.build()
    ddp_worker.loss_of(model, text, image, labels).backward()
    assert set(ddp_grads) == {name for name, _ in model.named_parameters()}
    for name, p in model.named_parameters():
        torch.testing.assert_close(ddp_grads[name], p.grad, rtol=1e-5, atol=1e-6, msg=name)
