"""The examples run as their docstrings say, and train."""

import importlib.util
from pathlib import Path

import pytest

from test_data import real_data_dir

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def load(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("extra", [[], ["--convert", "--amp", "bf16", "--ema", "0.99"], ["--amp", "fp16"]],
                         ids=["mlp", "converted-bf16-ema", "fp16-scaler"])
def test_custom_loop_trains(extra, capsys):
    acc = load("custom_loop").main(["--epochs", "1", "--train-subset", "4096", "--device", "cpu",
                                    "--data-dir", real_data_dir(), *extra])
    out = capsys.readouterr().out
    assert "epoch 1/1  train loss" in out and f"test acc {acc:.4f}" in out
    assert ("(EMA weights)" in out) == ("--ema" in extra)
    assert acc > 0.6  # 16 steps on 4096 images: well above chance (0.1)
