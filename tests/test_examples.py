"""The examples run (quick mode) and print what they claim."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))


def _main(name: str):
    return importlib.import_module(name).main


def test_multimodal_fusion_matches_seed_and_trains(capsys: pytest.CaptureFixture) -> None:
    result = _main("multimodal_fusion")(quick=True)
    assert result["logit_diff"] < 1e-5 and result["weight_diff"] < 1e-6
    assert result["last_loss"] < result["first_loss"]
    assert "largest difference to the seed's model" in capsys.readouterr().out


def test_six_way_transformer_matches_seed() -> None:
    result = _main("six_way_transformer")(quick=True)
    assert result["diff"] < 1e-5
    assert result["ours_ms"] > 0 and result["seed_ms"] > 0


def test_global_modality_attention_matches_dense_mask(capsys: pytest.CaptureFixture) -> None:
    result = _main("global_modality_attention")(quick=True)
    assert result["diff"] < 1e-4
    assert 0 < result["density"] < 1
    assert "BlockMask(" in capsys.readouterr().out


def test_convert_demo(capsys: pytest.CaptureFixture) -> None:
    result = _main("convert_demo")(quick=True)
    assert result["swapped"] == 4
    assert result["max_diff"] < 1e-4
    for key in ("fwd_speedup", "fwd+bwd_speedup"):
        assert result[key] > 0
    out = capsys.readouterr().out
    assert "mmattn.convert: 4 module(s) swapped" in out and "speed ratio" in out
