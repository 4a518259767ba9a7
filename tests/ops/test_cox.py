"""Cox PH loss: real peers (lifelines, scikit-survival, statsmodels), a brute-force float64
oracle, gradcheck, the Triton kernels (forced, launch-counted) and the C++ path vs the reference,
dtypes, shift invariance, edge cases, bad input, torch.compile and autocast."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from _tolerance import rel_error, tolerance

from lungcore import backend
from lungcore.nn import CoxPHLoss
from lungcore.ops import cox_ph_loss, cox_ph_loss_reference

BACKENDS = ["triton", "cpu"]


# ------------------------------------------------------------------------------------------------
# helpers

def brute_force(risk, time, event, ties="efron", weights=None, strata=None, mask=None):
    """Minus the log partial likelihood straight from its definition (float64, O(n^2))."""
    eta = np.asarray(risk, np.float64)
    n = len(eta)
    t = np.asarray(time, np.float64)
    e = np.asarray(event).astype(bool)
    w = np.ones(n) if weights is None else np.asarray(weights, np.float64)
    keep = w > 0 if mask is None else (w > 0) & np.asarray(mask, bool)
    s = np.zeros(n, int) if strata is None else np.asarray(strata)
    total = 0.0
    for stratum in np.unique(s[keep]):
        rows = keep & (s == stratum)
        for tt in np.unique(t[rows & e]):
            at_risk = rows & (t >= tt)
            dead = rows & e & (t == tt)
            big_s = np.sum(w[at_risk] * np.exp(eta[at_risk]))
            big_t = np.sum(w[dead] * np.exp(eta[dead]))
            d = dead.sum()
            if ties == "breslow":
                total += w[dead].sum() * np.log(big_s)
            else:
                total += w[dead].sum() / d * sum(np.log(big_s - l / d * big_t) for l in range(d))
            total -= np.sum(w[dead] * eta[dead])
    return total


def tied_data(rng, n, n_times=6, p_event=0.6, dtype=torch.float64):
    risk = torch.tensor(rng.normal(size=n), dtype=dtype)
    time = torch.tensor(rng.integers(0, n_times, n).astype(float))
    event = torch.tensor(rng.random(n) < p_event)
    return risk, time, event


def forced(name):
    return backend.use_backend(name)


rel = rel_error


def run(impl, risk, *args, grad_out=None, **kwargs):
    """Loss and d loss / d risk through backend ``impl`` (``reference`` = the oracle)."""
    r = risk.detach().clone().requires_grad_()
    if impl == "reference":
        kwargs.pop("block", None)
        out = cox_ph_loss_reference(r, *args, **kwargs)
    else:
        with forced(impl), backend.count_launches() as launches:
            out = cox_ph_loss(r, *args, **kwargs)
            go = torch.ones_like(out) if grad_out is None else grad_out.to(out.dtype)
            (grad,) = torch.autograd.grad(out, r, go)
        prefix = "cox_ph_loss.scan" if impl == "triton" else "cox_ph_loss.cpu"
        assert any(k.startswith(prefix) for k in launches), f"{impl} kernels did not run: {launches}"
        return out.detach(), grad
    go = torch.ones_like(out) if grad_out is None else grad_out.to(out.dtype)
    (grad,) = torch.autograd.grad(out, r, go)
    return out.detach(), grad


# ------------------------------------------------------------------------------------------------
# real data, real peers

# The peers are imported per test (pytest.importorskip), so a machine without one of them (the
# GPU machine lacks scikit-survival) skips only the tests that use it.
COHORTS = {"lung": ("load_lung", "time", "status"), "rossi": ("load_rossi", "week", "arrest")}


def _lifelines():
    return pytest.importorskip("lifelines")


def _cohort(name: str):
    """(frame, time column, event column) of a lifelines dataset (skips without lifelines)."""
    datasets = pytest.importorskip("lifelines.datasets")
    loader, tcol, ecol = COHORTS[name]
    df = getattr(datasets, loader)()
    return (df.dropna() if name == "lung" else df), tcol, ecol


@pytest.mark.parametrize("name", COHORTS)
@pytest.mark.parametrize("impl", ["reference", "cpu", "triton"])
def test_efron_sum_is_minus_lifelines_log_partial_likelihood(name, impl):
    df, tcol, ecol = _cohort(name)
    cph = _lifelines().CoxPHFitter().fit(df, tcol, ecol)
    x = df.drop(columns=[tcol, ecol]).to_numpy(float)
    eta = torch.tensor(x @ cph.params_.to_numpy())
    time, event = torch.tensor(df[tcol].to_numpy(float)), torch.tensor(df[ecol].to_numpy() == 1)
    loss, grad = run(impl, eta, time, event, ties="efron", reduction="sum")
    assert abs(float(loss) / -cph.log_likelihood_ - 1) < 1e-6
    # at the maximum the score X^T dL/deta vanishes (lifelines' convergence tolerance)
    assert np.abs(x.T @ grad.numpy()).max() < 1e-3 * np.abs(x).max()


@pytest.mark.parametrize("impl", ["reference", "cpu"])
def test_stratified_efron_matches_lifelines(impl):
    df = _cohort("rossi")[0]
    cph = _lifelines().CoxPHFitter().fit(df, "week", "arrest", strata=["race"])
    x = df.drop(columns=["week", "arrest", "race"])[cph.params_.index].to_numpy(float)
    eta = torch.tensor(x @ cph.params_.to_numpy())
    loss, _ = run(impl, eta, torch.tensor(df["week"].to_numpy(float)), torch.tensor(df["arrest"].to_numpy()),
                  reduction="sum", strata=torch.tensor(df["race"].to_numpy()))
    assert abs(float(loss) / -cph.log_likelihood_ - 1) < 1e-6


@pytest.mark.parametrize("impl", ["reference", "cpu"])
def test_weighted_efron_matches_lifelines(impl, rng):
    df = _cohort("rossi")[0].copy()
    df["w"] = rng.uniform(0.2, 3.0, len(df))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cph = _lifelines().CoxPHFitter().fit(df, "week", "arrest", weights_col="w", robust=True)
    x = df.drop(columns=["week", "arrest", "w"])[cph.params_.index].to_numpy(float)
    eta = torch.tensor(x @ cph.params_.to_numpy())
    loss, _ = run(impl, eta, torch.tensor(df["week"].to_numpy(float)), torch.tensor(df["arrest"].to_numpy()),
                  reduction="sum", weights=torch.tensor(df["w"].to_numpy()))
    assert abs(float(loss) / -cph.log_likelihood_ - 1) < 1e-6


def _breslow_data(name: str):
    df, tcol, ecol = _cohort(name)
    x = df.drop(columns=[tcol, ecol]).to_numpy(float)
    return x, df[tcol].to_numpy(float), df[ecol].to_numpy() == 1


@pytest.mark.parametrize("name", COHORTS)
def test_breslow_matches_scikit_survival(name):
    sksurv_lm = pytest.importorskip("sksurv.linear_model")
    from sksurv.linear_model.coxph import CoxPHOptimizer

    x, t, e = _breslow_data(name)
    y = np.array(list(zip(e, t)), dtype=[("e", bool), ("t", float)])
    coef = sksurv_lm.CoxPHSurvivalAnalysis(ties="breslow").fit(x, y).coef_
    nll = CoxPHOptimizer(x, e, t, np.zeros(x.shape[1]), "breslow").nlog_likelihood(coef) * len(t)
    for impl in ["reference", "cpu", "triton"]:
        loss, _ = run(impl, torch.tensor(x @ coef), torch.tensor(t), torch.tensor(e), ties="breslow", reduction="sum")
        assert abs(float(loss) / nll - 1) < 1e-6, impl


@pytest.mark.parametrize("name", COHORTS)
def test_breslow_matches_statsmodels(name):
    sm = pytest.importorskip("statsmodels.api")
    x, t, e = _breslow_data(name)
    model = sm.PHReg(t, x, status=e.astype(int), ties="breslow")
    coef = np.asarray(model.fit().params)
    for impl in ["reference", "cpu", "triton"]:
        loss, _ = run(impl, torch.tensor(x @ coef), torch.tensor(t), torch.tensor(e), ties="breslow", reduction="sum")
        assert abs(float(loss) / -model.loglike(coef) - 1) < 1e-6, impl


# ------------------------------------------------------------------------------------------------
# oracle and gradients

OPTIONS = [dict(), dict(weights=True), dict(strata=True), dict(mask=True),
           dict(weights=True, strata=True, mask=True)]


def _options(rng, n, opts):
    out = {}
    if opts.get("weights"):
        w = rng.uniform(0.1, 2.0, n)
        w[rng.random(n) < 0.1] = 0.0
        out["weights"] = torch.tensor(w)
    if opts.get("strata"):
        out["strata"] = torch.tensor(rng.integers(0, 3, n))
    if opts.get("mask"):
        out["mask"] = torch.tensor(rng.random(n) < 0.8)
    return out


@pytest.mark.parametrize("ties", ["efron", "breslow"])
@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: "+".join(o) or "plain")
def test_reference_equals_brute_force(rng, ties, opts):
    for n in (1, 2, 9, 40):
        risk, time, event = tied_data(rng, n, n_times=max(2, n // 5))
        kw = _options(rng, n, opts)
        loss = cox_ph_loss_reference(risk, time, event, ties=ties, reduction="sum", **kw)
        np_kw = {k: v.numpy() for k, v in kw.items()}
        assert float(loss) == pytest.approx(brute_force(risk.numpy(), time.numpy(), event.numpy(), ties, **np_kw),
                                            rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("ties", ["efron", "breslow"])
@pytest.mark.parametrize("impl", ["reference", "cpu", "triton"])
def test_gradcheck_float64(rng, ties, impl):
    n = 7 if impl == "triton" else 13          # the interpreter runs every perturbation
    risk, time, event = tied_data(rng, n, n_times=3)
    kw = _options(rng, n, dict(weights=True, strata=True, mask=True))
    kw["weights"][kw["weights"] == 0] = 0.5   # finite differences need every row live
    for reduction in ("mean", "none") if impl == "triton" else ("sum", "mean", "none"):
        def f(r):
            if impl == "reference":
                return cox_ph_loss_reference(r, time, event, ties=ties, reduction=reduction, **kw)
            with forced(impl):
                return cox_ph_loss(r, time, event, ties=ties, reduction=reduction, block=4, **kw)
        assert torch.autograd.gradcheck(f, (risk.clone().requires_grad_(),), eps=1e-6, atol=1e-8, rtol=1e-6)


# ------------------------------------------------------------------------------------------------
# kernels vs reference

@pytest.mark.parametrize("impl", BACKENDS)
@pytest.mark.parametrize("ties", ["efron", "breslow"])
@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: "+".join(o) or "plain")
def test_backend_equals_reference(rng, impl, ties, opts):
    # block=8 makes tie groups and strata span several Triton programs. "mean" runs the same kernels
    # as "sum" (the division is a torch op after them, tested with every backend by
    # test_none_sums_to_sum_and_mean_is_per_event): the interpreter skips it here
    reductions = ("sum", "none") if impl == "triton" else ("sum", "mean", "none")
    for n, n_times in ((1, 1), (7, 2), (40, 5), (23, 20)):
        risk, time, event = tied_data(rng, n, n_times=n_times)
        kw = _options(rng, n, opts)
        for reduction in reductions:
            go = torch.tensor(rng.normal(size=n)) if reduction == "none" else torch.tensor(0.7, dtype=torch.float64)
            ref, gref = run("reference", risk, time, event, ties=ties, reduction=reduction, grad_out=go, **kw)
            out, grad = run(impl, risk, time, event, ties=ties, reduction=reduction, grad_out=go, block=8, **kw)
            assert torch.allclose(out, ref, rtol=1e-12, atol=1e-12), (n, reduction)
            assert torch.allclose(grad, gref, rtol=1e-10, atol=1e-12), (n, reduction)


@pytest.mark.parametrize("ties", ["efron", "breslow"])
def test_triton_heavy_ties_and_all_censored_strata(rng, ties):
    n = 64
    risk, time, event = tied_data(rng, n, n_times=3)
    strata = torch.tensor(rng.integers(0, 4, n))
    event[strata == 2] = False                       # one stratum without events
    time[strata == 1] = 5.0                          # one stratum entirely tied
    for block in (4, 16, 128):
        ref, gref = run("reference", risk, time, event, ties=ties, reduction="sum", strata=strata)
        out, grad = run("triton", risk, time, event, ties=ties, reduction="sum", strata=strata, block=block)
        assert rel(out, ref) < 1e-12 and rel(grad, gref) < 1e-12
        assert torch.all(grad[strata == 2] == 0)      # in no event's risk set


def test_all_censored_stratum_rows_get_zero_gradient(rng):
    risk, time, event = tied_data(rng, 30, n_times=4)
    strata = torch.tensor(rng.integers(0, 3, 30))
    event[strata == 1] = False
    for impl in BACKENDS:
        _, grad = run(impl, risk, time, event, reduction="sum", strata=strata, block=8)
        assert torch.all(grad[strata == 1] == 0)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2), (torch.float16, 2e-2)])
@pytest.mark.parametrize("ties", ["efron", "breslow"])
def test_triton_dtypes(rng, dtype, tol, ties, device):
    risk, time, event = tied_data(rng, 300, n_times=20, dtype=dtype)
    risk, time, event = risk.to(device), time.to(device), event.to(device)
    ref, gref = run("reference", risk.double(), time, event, ties=ties, reduction="mean")
    out, grad = run("triton", risk, time, event, ties=ties, reduction="mean", block=64 if device == "cpu" else None)
    assert out.dtype == torch.float32 and grad.dtype == dtype
    # inputs are the same rounded values; the error is fp32 accumulation (+ rounding of the grad)
    assert rel(out, ref) < 1e-5
    assert rel(grad.double(), gref) < (1e-5 if dtype == torch.float32 else tol)


@pytest.mark.parametrize("impl", ["reference"] + BACKENDS)
def test_shift_invariance_and_large_log_hazards(rng, impl):
    risk, time, event = tied_data(rng, 50, n_times=8, dtype=torch.float32)
    base, gbase = run(impl, risk, time, event, reduction="sum", block=16)
    shifted, gshift = run(impl, risk + 1000.0, time, event, reduction="sum", block=16)
    exact, gexact = run("reference", (risk + 1000.0).double(), time, event, reduction="sum")
    assert torch.isfinite(shifted) and torch.isfinite(gshift).all()
    assert rel(shifted, exact) < 1e-5 and rel(gshift.double(), gexact) < 1e-5
    assert rel(shifted, base) < 1e-3      # only the fp32 rounding of risk + 1000 differs
    spread = risk * 400.0                 # log-hazards in about [-1200, 1200]
    out, grad = run(impl, spread, time, event, reduction="mean", block=16)
    ref, gref = run("reference", spread.double(), time, event, reduction="mean")
    assert torch.isfinite(out) and torch.isfinite(grad).all()
    assert rel(out, ref) < 1e-5 and rel(grad.double(), gref) < 1e-5


def test_triton_poisoned_outputs_and_bitwise_reruns(rng, monkeypatch):
    from lungcore.triton_kernels import cox as kernels

    class Poisoned:
        def __getattr__(self, name):
            return getattr(torch, name)

        @staticmethod
        def empty(*shape, **kw):
            t = torch.empty(*shape, **kw)
            return t.fill_(float("nan") if t.is_floating_point() else -7)

        @staticmethod
        def empty_like(x, **kw):
            t = torch.empty_like(x, **kw)
            return t.fill_(float("nan") if t.is_floating_point() else -7)

    monkeypatch.setattr(kernels, "torch", Poisoned())
    risk, time, event = tied_data(rng, 37, n_times=5, dtype=torch.float32)
    strata = torch.tensor(rng.integers(0, 2, 37))
    for reduction in ("mean", "none"):
        ref, gref = run("reference", risk.double(), time, event, reduction=reduction, strata=strata)
        a, ga = run("triton", risk, time, event, reduction=reduction, strata=strata, block=8)
        b, gb = run("triton", risk, time, event, reduction=reduction, strata=strata, block=8)
        assert torch.isfinite(a).all() and torch.isfinite(ga).all()
        assert rel(a, ref) < 1e-5 and rel(ga.double(), gref) < 1e-5
        assert torch.equal(a, b) and torch.equal(ga, gb)


# ------------------------------------------------------------------------------------------------
# edge cases

@pytest.mark.parametrize("impl", ["reference"] + BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_no_events_is_a_connected_finite_zero(impl, reduction):
    risk = torch.randn(6, requires_grad=True)
    time, event = torch.arange(6.0), torch.zeros(6, dtype=torch.bool)
    with forced(impl):
        loss = cox_ph_loss(risk, time, event, reduction=reduction)
    assert torch.all(loss == 0) and loss.requires_grad
    loss.sum().backward()
    assert torch.equal(risk.grad, torch.zeros(6))


@pytest.mark.parametrize("impl", ["reference"] + BACKENDS)
def test_one_sample_and_all_tied(impl, rng):
    r = torch.tensor([2.5], dtype=torch.float64)
    for ev in (True, False):
        loss, grad = run(impl, r, torch.tensor([3.0]), torch.tensor([ev]), reduction="sum")
        assert float(loss) == pytest.approx(0.0, abs=1e-12) and float(grad) == pytest.approx(0.0, abs=1e-12)
    risk = torch.tensor(rng.normal(size=9))
    event = torch.tensor([1, 1, 0, 1, 0, 1, 1, 1, 0])
    for ties in ("efron", "breslow"):
        loss, grad = run(impl, risk, torch.full((9,), 4.0), event, ties=ties, reduction="sum", block=4)
        assert float(loss) == pytest.approx(brute_force(risk.numpy(), np.full(9, 4.0), event.numpy(), ties), rel=1e-12)
        assert float(grad.sum()) == pytest.approx(0.0, abs=1e-10)   # shift invariance


@pytest.mark.parametrize("impl", ["reference"] + BACKENDS)
def test_mask_equals_dropping_rows(impl, rng):
    risk, time, event = tied_data(rng, 30, n_times=5)
    mask = torch.tensor(rng.random(30) < 0.7)
    junk_time = time.clone()
    junk_time[~mask] = float("nan")                  # absent endpoint: anything goes
    loss, grad = run(impl, risk, junk_time, event, reduction="mean", mask=mask, block=8)
    sub, gsub = run("reference", risk[mask], time[mask], event[mask], reduction="mean")
    assert rel(loss, sub) < 1e-12 and rel(grad[mask], gsub) < 1e-12
    assert torch.all(grad[~mask] == 0)


@pytest.mark.parametrize("impl", ["reference"] + BACKENDS)
def test_none_sums_to_sum_and_mean_is_per_event(impl, rng):
    risk, time, event = tied_data(rng, 25, n_times=4)
    w = torch.tensor(rng.uniform(0.5, 2, 25))
    terms, _ = run(impl, risk, time, event, reduction="none", weights=w, block=8)
    total, _ = run(impl, risk, time, event, reduction="sum", weights=w, block=8)
    mean, _ = run(impl, risk, time, event, reduction="mean", weights=w, block=8)
    assert torch.all(terms[~event] == 0)
    assert float(terms.sum()) == pytest.approx(float(total), rel=1e-12)
    assert float(mean) == pytest.approx(float(total) / float(w[event].sum()), rel=1e-12)


def test_bad_input_names_the_argument():
    r, t, e = torch.randn(4), torch.tensor([1.0, 2, 3, 4]), torch.tensor([1, 0, 1, 1])
    with pytest.raises(ValueError, match="risk.*NaN|risk\\[1\\]"):
        cox_ph_loss(torch.tensor([0.0, float("nan"), 1, 2]), t, e)
    with pytest.raises(ValueError, match="time\\[2\\] is negative"):
        cox_ph_loss(r, torch.tensor([1.0, 2, -3, 4]), e)
    with pytest.raises(ValueError, match="time\\[0\\] is nan"):
        cox_ph_loss(r, torch.tensor([float("nan"), 2, 3, 4]), e)
    with pytest.raises(ValueError, match="event\\[3\\] is 2"):
        cox_ph_loss(r, t, torch.tensor([1, 0, 1, 2]))
    with pytest.raises(ValueError, match="weights\\[1\\] is negative"):
        cox_ph_loss(r, t, e, weights=torch.tensor([1.0, -1, 1, 1]))
    with pytest.raises(ValueError, match="same length"):
        cox_ph_loss(r, t[:3], e)
    with pytest.raises(ValueError, match="risk must have shape"):
        cox_ph_loss(torch.randn(4, 2), t, e)
    with pytest.raises(TypeError, match="risk must have dtype"):
        cox_ph_loss(torch.arange(4), t, e)
    with pytest.raises(ValueError, match="ties must be one of"):
        cox_ph_loss(r, t, e, ties="exact")
    with pytest.raises(ValueError, match="reduction must be one of"):
        cox_ph_loss(r, t, e, reduction="avg")
    for block in (3, 100, 0, -4, 2.5, True, "8"):
        with pytest.raises(ValueError, match="block must be None or a power of two"):
            cox_ph_loss(r, t, e, block=block)
    with pytest.raises(TypeError, match="strata must hold integer"):
        cox_ph_loss(r, t, e, strata=torch.zeros(4))
    with pytest.raises(TypeError, match="mask must have dtype"):
        cox_ph_loss(r, t, e, mask=torch.ones(4))


# ------------------------------------------------------------------------------------------------
# module, torch.compile, autocast

def test_module_trains_under_torch_compile(rng):
    torch.manual_seed(0)
    n = 64
    x = torch.randn(n, 3)
    true = torch.tensor([1.0, -0.5, 0.0])
    time = torch.tensor(np.round(rng.exponential(1.0, n) * np.exp(-(x @ true).numpy()), 1))
    event = torch.tensor(rng.random(n) < 0.8)
    model = torch.nn.Linear(3, 1)
    loss_fn = CoxPHLoss(ties="efron")
    step = torch.compile(lambda: loss_fn(model(x), time, event))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    losses = []
    for _ in range(15):
        opt.zero_grad()
        loss = step()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0] - 0.05
    assert float(torch.nn.functional.cosine_similarity(model.weight.detach()[0], true, dim=0)) > 0.8


def test_triton_op_under_torch_compile_and_autocast(rng):
    risk, time, event = tied_data(rng, 20, n_times=4, dtype=torch.float32)
    model = torch.nn.Linear(2, 1)
    x = torch.randn(20, 2)

    def f():
        with forced("triton"):
            return cox_ph_loss(model(x), time, event, block=8)

    ref = cox_ph_loss_reference(model(x).double(), time, event)
    compiled = torch.compile(f)
    with backend.count_launches() as launches:
        out = compiled()
        out.backward()
    assert any(k.startswith("cox_ph_loss.scan") for k in launches)
    assert rel(out.detach(), ref.detach()) < 1e-5
    with torch.autocast("cpu", dtype=torch.bfloat16):
        risk_bf16 = model(x)
        assert risk_bf16.dtype == torch.bfloat16
        with forced("triton"):
            loss = cox_ph_loss(risk_bf16, time, event, block=8)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(model.weight.grad).all()


@pytest.mark.parametrize("impl", BACKENDS)
def test_cox_loss_module_runs_the_kernel_and_matches_brute_force(rng, impl):
    """CoxPHLoss with each kernel forced (launches counted) against the O(n^2) float64 definition."""
    risk, time, event = tied_data(rng, 12, n_times=3, dtype=torch.float32)
    m = CoxPHLoss(ties="breslow", reduction="sum")
    assert "breslow" in repr(m)
    prefix = "cox_ph_loss.scan" if impl == "triton" else "cox_ph_loss.cpu"
    with forced(impl), backend.count_launches() as launches:
        loss = m(risk[:, None], time, event)
    assert any(k.startswith(prefix) for k in launches), dict(launches)
    expected = brute_force(risk.numpy(), time.numpy(), event.numpy(), ties="breslow")
    assert rel_error(loss, torch.tensor(expected)) < tolerance(torch.float32)
    with pytest.raises(ValueError, match="ties"):
        CoxPHLoss(ties="exact")


def test_triton_carry_scan_spans_several_chunks(rng):
    # block=4 and 300 rows: 75 programs, so the one-program carry scan loops over 2 chunks of 64
    risk, time, event = tied_data(rng, 300, n_times=30)
    strata = torch.tensor(rng.integers(0, 3, 300))
    ref, gref = run("reference", risk, time, event, reduction="mean", strata=strata)
    out, grad = run("triton", risk, time, event, reduction="mean", strata=strata, block=4)
    assert rel(out, ref) < 1e-12 and rel(grad, gref) < 1e-12


@pytest.mark.cuda
@pytest.mark.parametrize("kind", ["days", "continuous"])
def test_triton_large_batch_on_gpu(kind):
    # about 2,000 programs of 1,024: the carry scan loops, tie groups of ~1,000 span programs
    g = torch.Generator().manual_seed(0)
    n = (1 << 21) + 12_345
    risk = torch.randn(n, generator=g).cuda()
    time = (torch.randint(0, 2000, (n,), generator=g).float() if kind == "days"
            else torch.rand(n, generator=g) * 2000).cuda()
    event = (torch.rand(n, generator=g) < 0.7).cuda()
    ref, gref = run("reference", risk.double(), time, event, reduction="mean")
    out, grad = run("triton", risk, time, event, reduction="mean", block=1024)
    assert rel(out, ref) < 1e-5 and rel(grad.double(), gref) < 1e-5
