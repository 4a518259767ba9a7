"""lungcore.checks: the argument checks behind every op and metric name the bad entry."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from lungcore import checks
from lungcore.metrics import concordance_index


def test_bfloat16_tensors_reach_the_host_exactly():
    values = torch.tensor([0.1, 2.5, -3.0], dtype=torch.bfloat16)
    host = checks.host_1d("risk", values)
    assert host.dtype == np.float64
    assert np.array_equal(host, values.float().numpy().astype(np.float64))
    time, event = np.array([3.0, 1.0, 2.0]), np.array([1, 1, 0])
    assert concordance_index(values, time, event) == concordance_index(values.float(), time, event)


def test_a_dtype_numpy_lacks_is_named():
    with pytest.raises(TypeError, match="risk must be array-like numbers, got Tensor"):
        checks.to_host("risk", torch.zeros(2, dtype=torch.float8_e4m3fn))


@pytest.mark.parametrize("check, array, message", [
    (checks.finite, np.array([[0.5, 1.0], [2.0, np.nan]]), r"x\[1, 1\] is nan: x must be finite \(1 bad values\)"),
    (checks.finite, np.zeros((2, 3, 4)) + np.where(np.arange(24).reshape(2, 3, 4) == 13, np.inf, 0),
     r"x\[1, 0, 1\] is inf"),
    (checks.finite, np.float64("nan"), r"^x is nan"),
    (checks.nonnegative, np.array([[1.0, 2.0], [-3.0, 1.0]]), r"x\[1, 0\] is negative \(-3.0\)"),
    (checks.nonnegative, np.array([1.0, -2.0]), r"x\[1\] is negative \(-2.0\)"),
])
def test_the_first_bad_entry_is_named_on_every_axis(check, array, message):
    with pytest.raises(ValueError, match=message):
        check("x", array)


@pytest.mark.parametrize("check, value, message", [
    (checks.finite_number, "3", "fill must be a number, got '3'"),
    (checks.finite_number, b"3", "fill must be a number, got b'3'"),
    (checks.hu_window, "12", r"fill must be \(low, high\) in HU, got '12'"),
    (checks.hu_window, b"12", r"fill must be \(low, high\) in HU, got b'12'"),
])
def test_strings_are_not_numbers(check, value, message):
    with pytest.raises(TypeError, match=message):
        check("fill", value)
