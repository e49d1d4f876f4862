"""fastmlp: fused C++/CUDA kernels for training multi-layer perceptrons fast in PyTorch."""

from ._loader import load_extension as _load_extension

_build_info = _load_extension()

from . import ops  # noqa: E402  (registers fake kernels, autograd and must follow the load)
from .ops import export_decompositions  # noqa: E402
from . import functional, nn  # noqa: E402
from .nn import FusedLinear, convert  # noqa: E402
from . import optim  # noqa: E402
from . import monitor  # noqa: E402

__version__ = "0.1.0"
WITH_CUDA = _build_info.WITH_CUDA

__all__ = ["FusedLinear", "convert", "export_decompositions", "functional", "monitor", "nn", "ops", "optim", "WITH_CUDA", "__version__"]
