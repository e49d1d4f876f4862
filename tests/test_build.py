"""The build and loader: readable errors instead of undefined symbols."""

import types

import pytest
import torch

import fastmlp
from fastmlp import _loader


def test_build_info_records_the_torch_it_was_built_against():
    assert fastmlp._build_info.TORCH_VERSION.split("+")[0] == torch.__version__.split("+")[0]
    assert isinstance(fastmlp.WITH_CUDA, bool)


def test_torch_version_mismatch_says_rebuild(monkeypatch):
    fake = types.ModuleType("fastmlp._build_info")
    fake.TORCH_VERSION, fake.WITH_CUDA, fake.CUDA_ARCH_LIST = "1.13.0", False, ""
    monkeypatch.setitem(__import__("sys").modules, "fastmlp._build_info", fake)
    monkeypatch.setattr(fastmlp, "_build_info", fake, raising=False)
    with pytest.raises(ImportError, match=r"built against torch 1\.13\.0, but torch .* is running.*pip install --no-build-isolation"):
        _loader.load_extension()


def test_ops_are_registered_for_cpu_autograd_and_autocast():
    for name in ("linear_act_forward", "linear_act_backward"):
        op = getattr(torch.ops.fastmlp, name).default
        for key in ("CPU", "Autograd"):
            assert torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), key), (name, key)
    assert torch._C._dispatch_has_kernel_for_dispatch_key("fastmlp::linear_act_forward", "AutocastCPU")
