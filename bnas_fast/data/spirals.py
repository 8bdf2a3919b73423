"""The 2-armed spirals of the learnt-depth paper (seed 000, section 3.1 and appendix C).

Generative process, per point (all randomness from one ``torch.Generator``, so the global RNG is
never touched and the same seed gives the same data on every machine):

    k   ~ the arm (class), exactly balanced over the N points, then shuffled
    u   ~ U(0, 1);  phi = sqrt(u) * rotation          # angle along the arm; rotation = 720 deg = 4 pi
    x   = phi * (cos(phi + 2 pi k / K), sin(phi + 2 pi k / K)) + noise * N(0, I_2)

The radius equals the angle swept in radians (the scale of the authors' public generator, so inputs
lie in about [-4 pi, 4 pi]^2 for 720 degrees), and sqrt(u) spreads the points evenly along the arm
(arc length grows like phi^2). Neighbouring arms are 2 pi / K apart radially (pi for K = 2), so
sigma = 0.15 Gaussian noise, as the paper's text states (the authors' code adds uniform [0, sigma)
noise instead), leaves the arms distinct except near the centre where they meet: with 200 training
points the difficulty is the spiral's shape, which a linear or shallow width-20 network cannot fit
(section 3.1), not label noise.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import Tensor
from torch.utils.data import TensorDataset

from bnas_fast.data.common import Splits

__all__ = ["make_spirals", "spirals"]


def make_spirals(
    n: int,
    *,
    n_arms: int = 2,
    rotation: float = 720.0,
    noise: float = 0.15,
    generator: Optional[torch.Generator] = None,
) -> Tuple[Tensor, Tensor]:
    """Draw ``n`` labelled points from the spiral process in the module docstring.

    Args:
        n: number of points (>= 1).
        n_arms: number of arms K = number of classes (>= 2).
        rotation: degrees swept by each arm (> 0); 720 in the paper, varied in appendix C.
        noise: standard deviation of the isotropic Gaussian noise (>= 0).
        generator: source of randomness. If None, a fresh ``torch.Generator()`` (always the same default
            seed): the global RNG is never consumed either way.

    Returns:
        x: float32 [n, 2]; y: int64 [n] in [0, n_arms).
    """
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"make_spirals: n must be a positive int, got {n!r}")
    if not isinstance(n_arms, int) or n_arms < 2:
        raise ValueError(f"make_spirals: n_arms must be an int >= 2, got {n_arms!r}")
    if not rotation > 0 or not math.isfinite(rotation):
        raise ValueError(f"make_spirals: rotation must be a positive number of degrees, got {rotation!r}")
    if not noise >= 0 or not math.isfinite(noise):
        raise ValueError(f"make_spirals: noise must be a non-negative standard deviation, got {noise!r}")
    if generator is None:
        generator = torch.Generator()
    elif not isinstance(generator, torch.Generator):
        raise TypeError(f"make_spirals: generator must be a torch.Generator, got {type(generator).__name__}")
    # float64 internally: the data must not depend on how float32 rounding falls on a given CPU.
    y = torch.arange(n, dtype=torch.int64) % n_arms
    y = y[torch.randperm(n, generator=generator)]
    phi = torch.rand(n, generator=generator, dtype=torch.float64).sqrt() * math.radians(rotation)
    angle = phi + 2 * math.pi * y.to(torch.float64) / n_arms
    x = torch.stack([phi * torch.cos(angle), phi * torch.sin(angle)], dim=1)
    x = x + noise * torch.randn(n, 2, generator=generator, dtype=torch.float64)
    return x.to(torch.float32), y


def spirals(
    seed: int = 0,
    n_train: int = 200,
    n_test: int = 1800,
    *,
    n_arms: int = 2,
    rotation: float = 720.0,
    noise: float = 0.15,
) -> Splits:
    """The paper's spirals: 200 training and 1800 test points from the same process (section 3.1).

    The training points are drawn first, then the test points, from ``torch.Generator().manual_seed(seed)``:
    the same seed gives the same split; the global RNG is untouched.

    Returns:
        :class:`Splits` with ``source = "spirals(seed=..., rotation=..., noise=...)"``, 2 input features
        and ``n_arms`` classes.
    """
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"spirals: seed must be an int, got {type(seed).__name__}")
    for name, value in (("n_train", n_train), ("n_test", n_test)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"spirals: {name} must be a positive int, got {value!r}")
    gen = torch.Generator().manual_seed(seed)
    kwargs = dict(n_arms=n_arms, rotation=rotation, noise=noise, generator=gen)
    x_train, y_train = make_spirals(n_train, **kwargs)
    x_test, y_test = make_spirals(n_test, **kwargs)
    return Splits(
        train=TensorDataset(x_train, y_train),
        test=TensorDataset(x_test, y_test),
        source=f"spirals(seed={seed}, arms={n_arms}, rotation={rotation:g}, noise={noise:g})",
        num_classes=n_arms,
        input_shape=(2,),
    )
