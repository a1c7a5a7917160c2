"""tinymoe: OpenMoE rebuilt from scratch on NumPy (and CuPy on a GPU).

    import tinymoe
    tinymoe.set_device("cpu")        # or "cuda" (needs CuPy and a GPU); default: TINYMOE_DEVICE or cpu
    x = tinymoe.tensor([[1.0, 2.0]], requires_grad=True)
"""
from tinymoe.backend import get_device, set_device, to_numpy, cuda_available, DeviceError
from tinymoe.autograd import Tensor, Function, no_grad, enable_grad, tensor
from tinymoe import functional

__version__ = "0.1.0"
__all__ = ["Tensor", "Function", "no_grad", "enable_grad", "tensor", "functional",
           "set_device", "get_device", "to_numpy", "cuda_available", "DeviceError"]
