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


def _outcome(check, *args):
    try:
        return "ok", check(*args)
    except (TypeError, ValueError) as exc:
        return type(exc).__name__, str(exc)


@pytest.mark.parametrize("value", [
    (2.5, 0.7, 0.7), [1, 2, 3], 1.0, 2, (1, 2), [], (1, 0, 1), (1, float("nan"), 1), (1, float("inf"), 2),
    (1, -0.0, 1), [[1, 2, 3]], (10**400, 1, 1), [1.0, 2.5, "2"],
])
def test_spacing_in_plain_python_matches_the_numpy_path(value):
    """Plain numbers take the numpy-free path (torch.compile traces it); a numpy array or a tensor of
    the same values gives the same spacing or the same error (which quotes the value as given)."""
    for allow_scalar in (False, True):
        plain = _outcome(checks.spacing3, "spacing", value, allow_scalar)
        try:
            array = np.asarray(value, dtype=np.float64)
        except (TypeError, ValueError, OverflowError):  # numpy refuses it too
            assert plain[0] == "TypeError" and "array-like" in plain[1]
            continue
        for other in (array, torch.from_numpy(array)):
            kind, result = _outcome(checks.spacing3, "spacing", other, allow_scalar)
            if kind != "ok":
                result = result.replace(repr(other), repr(value))
            assert (kind, result) == plain, other


@pytest.mark.parametrize("value", [
    [2, 2, 3], [[2, 2, 3]], [[2, 2, 3], [4, 0, 0]], [[1, 1, float("nan")], [9, 9, 9]], [[1, 1, 1], [1, 9, 1]],
    [[1, 1]], [1, 2, 3, 4], [-0.5, -0.5, -0.5], [3.5, 4.5, 5.5], [3.5000001, 4.5, 5.5],
    ((0.3, 1.7, 2.2), [3.9, 0.1, 5.4]),
])
def test_points_in_plain_python_match_the_numpy_path(value):
    plain = _outcome(checks.point_rows, "centers", value, (4, 5, 6))
    for other in (np.asarray(value, dtype=np.float64), torch.tensor(value, dtype=torch.float64)):
        assert _outcome(checks.point_rows, "centers", other, (4, 5, 6)) == plain
    if plain[0] == "ok":
        assert np.array_equal(checks.points_in_volume("centers", value, (4, 5, 6)), np.asarray(plain[1]).reshape(-1, 3))
    else:  # the vectorised check words every error as the row-by-row one does
        assert _outcome(checks.points_in_volume, "centers", value, (4, 5, 6)) == plain


def test_volume_torch_dtype_agrees_with_volume_dtype_for_every_torch_dtype():
    """The numpy-free table for torch dtypes (what torch.compile traces) reads what volume_dtype reads,
    and refuses what it refuses with its message."""
    dtypes = [d for d in vars(torch).values() if isinstance(d, torch.dtype)]
    for dtype in dtypes:
        expected = _outcome(checks.volume_dtype, "volume", dtype)
        if expected[0] == "ok":
            expected = ("ok", checks.torch_dtype(expected[1]))
        assert _outcome(checks.volume_torch_dtype, "volume", dtype) == expected, dtype


@pytest.mark.parametrize("model, field", [("csfnet", "t1_only"), ("csfnet", "use_clinical"),
                                          ("cmml", "norm_pix_loss")])
def test_model_booleans_refuse_strings(model, field):
    """A quoted YAML ``"false"`` in model_overrides is a truthy string: refused by name, not taken as true."""
    from lungcore.models.cmml import CMMLConfig
    from lungcore.models.csfnet import CSFNetConfig

    config = {"csfnet": CSFNetConfig, "cmml": CMMLConfig}[model]
    for bad in ("false", "no", 1, None):
        with pytest.raises(ValueError, match=f"{field} must be true or false, got {bad!r}"):
            config(**{field: bad})
    assert getattr(config(**{field: np.bool_(True)}), field) is True
