"""The return type shared by the loaders."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

from torch.utils.data import TensorDataset


@dataclass
class Splits:
    """A train and a test TensorDataset of (inputs, int64 targets).

    Attributes:
        train, test: ``TensorDataset(x, y)`` with x float32 [N, *input_shape] and y int64 [N].
        source: where the data came from, e.g. ``"spirals(seed=0)"``, ``"fashion-mnist (/usr/share/...)"``
            or ``"sklearn-digits"``. A caller that asked for Fashion-MNIST checks this to know whether
            it got it.
        num_classes: number of classes C (targets are in [0, C)).
        input_shape: shape of one input, e.g. (2,) or (1, 28, 28).
    """

    train: TensorDataset
    test: TensorDataset
    source: str
    num_classes: int
    input_shape: Tuple[int, ...]

    def __repr__(self) -> str:
        return (
            f"Splits(source={self.source!r}, train={len(self.train)}, test={len(self.test)}, "
            f"num_classes={self.num_classes}, input_shape={self.input_shape})"
        )
