"""The elementwise closeness check shared by the test ladders (each keeps its own TOLERANCES table)."""

from torch import Tensor


def assert_within(actual: Tensor, expected: Tensor, tol: dict, what: str = "") -> None:
    """|actual - expected| <= tol["atol"] + tol["rtol"] * |expected| elementwise; NaN is a mismatch.

    (torch.testing.assert_close does the same but is several times slower on the 5M-element cases.)
    """
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a, e = actual.detach().double(), expected.detach().double()
    excess = (a - e).abs() - (tol["atol"] + tol["rtol"] * e.abs())
    bad = ~(excess <= 0)
    if bool(bad.any()):
        flat = excess.flatten().nan_to_num(float("inf"))
        i = int(flat.masked_fill(~bad.flatten(), -float("inf")).argmax())
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {a.numel()} elements outside {tol}; worst at flat index {i}: "
            f"got {a.flatten()[i].item()!r}, expected {e.flatten()[i].item()!r}"
        )
