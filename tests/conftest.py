import pytest
import torch

import fastmlp  # noqa: F401  (loads the extension; fails loudly if it was not built)

HAS_CUDA = torch.cuda.is_available() and fastmlp.WITH_CUDA

# Every kernel test takes the `device` fixture: CPU always, CUDA when a GPU and the CUDA build
# are present, otherwise the CUDA variant is skipped with its reason.
DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=[
            pytest.mark.cuda,
            pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU and fastmlp built with CUDA kernels"),
        ],
    ),
]


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
