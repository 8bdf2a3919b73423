"""Argument checks shared by the public functions.

They look only at metadata (shape, dtype, device), so they cost nothing under torch.compile and
never synchronise a GPU. Value checks (NaN weights, indices out of range) live in the kernels and
in the reference wrappers registered as kernels, where the data is read anyway.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor


#: Largest kernel size, stride, padding, dilation or input size the convolution ops take
#: (csrc/common.h, kMaxGeometry): below 2^31, their sums cannot overflow 64-bit index arithmetic.
MAX_GEOMETRY = 2**31 - 1


def check_tensor(name: str, value: object, op: str) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def check_floating(name: str, value: Tensor, op: str) -> None:
    if not value.dtype.is_floating_point:
        raise TypeError(f"{op}: {name} must be a floating-point tensor, got dtype {value.dtype}")


def check_same_dtype(name: str, value: Tensor, ref_name: str, ref: Tensor, op: str) -> None:
    if value.dtype != ref.dtype:
        raise TypeError(f"{op}: {name} has dtype {value.dtype} but {ref_name} has dtype {ref.dtype}")


def check_same_device(name: str, value: Tensor, ref_name: str, ref: Tensor, op: str) -> None:
    if value.device != ref.device:
        raise ValueError(f"{op}: {name} is on {value.device} but {ref_name} is on {ref.device}")


def check_tensor_list(name: str, values: object, op: str) -> Sequence[Tensor]:
    if isinstance(values, Tensor) or not isinstance(values, (list, tuple)):
        raise TypeError(
            f"{op}: {name} must be a list or tuple of tensors, got {type(values).__name__}"
            + (" (pass the candidates as a list; they are never stacked)" if isinstance(values, Tensor) else "")
        )
    for k, v in enumerate(values):
        check_tensor(f"{name}[{k}]", v, op)
    return values


def all_finite(value: Tensor) -> bool:
    """Whether every entry of ``value`` is finite, from one read of it and no temporary as large as
    it (``torch.isfinite(value).all()`` writes a boolean tensor of value's size first: 0.41 ms
    against 0.05 ms on a [32, 32, 16, 16] float32 tensor here). ``torch.aminmax`` propagates NaN
    (documented), and an infinity is the minimum or the maximum. An empty tensor is finite."""
    if value.numel() == 0:
        return True
    low, high = torch.aminmax(value.detach())
    return bool(torch.isfinite(low) & torch.isfinite(high))


def check_finite_values(name: str, value: Tensor, op: str) -> None:
    """Reads the tensor: for the small weight tables only."""
    if not all_finite(value):
        bad = (~torch.isfinite(value)).nonzero()[0].tolist()
        raise ValueError(f"{op}: {name} contains a non-finite value (NaN or infinity) at index {bad}")


def check_int(name: str, value: object, op: str, minimum: int) -> int:
    """An int >= minimum, returned. A bool would pass as 0 or 1, and a float or a negative count
    would fail deep inside torch (randint, expand, empty) with a message naming nothing of ours.
    ValueError for both a wrong type and a value out of range, as the library's other counts."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        what = "a positive int" if minimum == 1 else f"an int >= {minimum}"
        raise ValueError(f"{op}: {name} must be {what}, got {value!r}")
    return value


def check_bool(name: str, value: object, op: str) -> None:
    """A flag must be a real bool: 0, 1, "False" or None would otherwise pass as their truth value."""
    if not isinstance(value, bool):
        raise TypeError(f"{op}: {name} must be a bool (True or False), got {value!r}")


def check_index_range(name: str, index: Tensor, size: int, op: str, what: str = "a batch of B") -> None:
    """Reads the index tensor."""
    if index.numel() and (int(index.min()) < 0 or int(index.max()) >= size):
        bad = int(index[(index < 0) | (index >= size)][0])
        raise IndexError(f"{op}: {name} holds {bad}, out of range for {what} = {size}")
