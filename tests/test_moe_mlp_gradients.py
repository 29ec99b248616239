"""The MoE router's gradients, as docs/ops.md#shiftmoemlp states them: the gate g = softmax(l)[e]
gives the router a gradient from the task loss alone, and the balancing loss's load term has the
straight-through gradient of the importance (its value the token counts). Both are checked
against NumPy statements of the spec, not against the layer's own code."""
import numpy as np
import pytest
import torch
from torch import nn

from mfconvert.nn import ShiftMoEMLP
from mfconvert.nn.moe_mlp import balance_loss, balance_loss_from_logits

pytestmark = pytest.mark.usefixtures("one_torch_thread")
D, HIDDEN, TOKENS = 16, 48, 96


def block(router_std=1.0, balance_coef=0.0):
    """A small GELU MLP (the teacher) and its MoE block; router_std 1 gives soft gates (~0.6)."""
    torch.manual_seed(0)
    fc1, act, fc2 = nn.Linear(D, HIDDEN), nn.GELU(), nn.Linear(HIDDEN, D)
    moe = ShiftMoEMLP.from_mlp(fc1, act, fc2, router_std=router_std, balance_coef=balance_coef)
    x = torch.randn(TOKENS, D, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        target = fc2(act(fc1(x)))
    return moe, x, target


def task_loss(moe, x, target):
    return nn.functional.mse_loss(moe(x), target)


def test_router_learns_from_the_task_loss_alone():
    """Balance coefficient 0: the router weight still gets a non-zero gradient (through the gate)
    and a few SGD steps on the router alone lower the distillation loss. A gate detached from the
    graph (or a constant gate, as in ShiftAddViT's release) gives no gradient and no progress."""
    moe, x, target = block()
    moe.train()
    with torch.no_grad():
        gates = moe.route(x)[0].max(1).values
    assert gates.mean() < 0.8                                 # soft gates: the gate matters
    loss0 = task_loss(moe, x, target)
    assert moe.aux_loss.item() == 0.0
    loss0.backward()
    grad = moe.router.weight.grad
    assert grad is not None and grad.abs().max() > 1e-4, grad
    opt = torch.optim.SGD(moe.router.parameters(), lr=10.0)
    losses = []
    for _ in range(5):
        opt.zero_grad()
        loss = task_loss(moe, x, target)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    with torch.no_grad():
        losses.append(task_loss(moe, x, target).item())
    # Measured (seed 0): 6.1e-3 → 4.1e-3 after 5 steps, mean gate 0.69 → 0.73; with the gate
    # detached the router has no gradient at all.
    assert all(b < a for a, b in zip(losses, losses[1:])) and losses[-1] < 0.8 * losses[0], losses


def np_cv2_grad(v):
    """(cv²(v), d cv²/dv) in float64, cv² = population variance / (mean² + 1e-10)."""
    n, m = len(v), v.mean()
    var = ((v - m) ** 2).mean()
    den = m * m + 1e-10
    return var / den, (2 * (v - m) / n * den - var * 2 * m / n) / den ** 2


def np_balance_grad(logits, latency):
    """d loss_balance / d logits by hand (docs/ops.md: load's value the counts, its gradient the
    importance's): G_k = τ_k (cv²'(τ⊙I)_k + cv²'(τ⊙L)_k), dI_k/dl_tj = p_tk (δ_kj − p_tj)."""
    l = logits.astype(np.float64)
    p = np.exp(l - l.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    counts = np.bincount(l.argmax(1), minlength=l.shape[1]).astype(np.float64)
    c_i, g_i = np_cv2_grad(latency * p.sum(0))
    c_l, g_l = np_cv2_grad(latency * counts)
    big_g = latency * (g_i + g_l)
    grad = p * big_g[None, :] - p * (p @ big_g)[:, None]
    return c_i + c_l, grad


def surrogate(logits, latency, counts, imp0):
    """The straight-through loss as a smooth function for finite differences: load = counts +
    I(l) − I(l₀), with the counts and I(l₀) = imp0 frozen at l₀."""
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    imp = p.sum(0)
    return np_cv2_grad(latency * imp)[0] + np_cv2_grad(latency * (counts + imp - imp0))[0]


@pytest.mark.parametrize("skew", [0.0, 1.5])
def test_load_term_has_the_straight_through_gradient(skew):
    """Autograd's gradient of the balancing loss (balance_loss, balance_loss_from_logits and the
    layer's aux_loss through the router) equals the analytic gradient of the spec's definition and
    a central finite difference of its smooth surrogate. Without the straight-through term
    (load = counts only) the load term's part is missing: measured 0.53× and 5.9× the largest
    entry of the full gradient for the two skews."""
    rng = np.random.default_rng(5)
    logits = (rng.standard_normal((40, 2)) + [0.0, skew]).astype(np.float32)   # skewed: unbalanced loads
    latency = np.array([2.8, 4.4])
    value, expect = np_balance_grad(logits, latency)
    # Finite differences of the surrogate (float64, h = 1e-6: truncation ~h², rounding ~1e-16/h).
    l64 = logits.astype(np.float64)
    p0 = np.exp(l64 - l64.max(1, keepdims=True))
    p0 /= p0.sum(1, keepdims=True)
    counts = np.bincount(l64.argmax(1), minlength=2).astype(np.float64)
    fd = np.zeros_like(l64)
    for idx in np.ndindex(*l64.shape):
        e = np.zeros_like(l64)
        e[idx] = 1e-6
        fd[idx] = (surrogate(l64 + e, latency, counts, p0.sum(0)) - surrogate(l64 - e, latency, counts, p0.sum(0))) / 2e-6
    np.testing.assert_allclose(fd, expect, rtol=1e-6, atol=1e-9)
    # The load term's share of the gradient is not negligible (so dropping it is caught).
    _, g_imp_only = np_cv2_grad(latency * p0.sum(0))
    p = p0
    imp_only = p * (latency * g_imp_only)[None, :] - p * (p @ (latency * g_imp_only))[:, None]
    assert np.abs(expect - imp_only).max() > 0.2 * np.abs(expect).max()

    lt = torch.tensor(logits, dtype=torch.float64, requires_grad=True)
    loss = balance_loss(lt.softmax(-1), lt.argmax(-1), torch.tensor(latency))
    loss.backward()
    # float64 throughout: agreement to rounding (~1e-15 relative).
    assert loss.item() == pytest.approx(value, rel=1e-12)
    np.testing.assert_allclose(lt.grad.numpy(), expect, rtol=1e-9, atol=1e-13)

    lt.grad = None
    loss = balance_loss_from_logits(lt, torch.tensor(latency))
    loss.backward()
    np.testing.assert_allclose(lt.grad.numpy(), expect, rtol=1e-9, atol=1e-13)

    # Through the layer: aux_loss = α · loss_balance of the router logits l = x W_rᵀ + b_r, so
    # dW_r = α · gradᵀ x with grad taken at the layer's own logits.
    moe, x, _ = block(balance_coef=0.01)
    moe = moe.double().train()
    x = x.double()
    moe(x)
    moe.aux_loss.backward()
    with torch.no_grad():
        l_layer = moe.router(x).numpy()
    _, g = np_balance_grad(l_layer, np.array(moe.latency.tolist()))
    np.testing.assert_allclose(moe.router.weight.grad.numpy(), 0.01 * g.T @ x.numpy(), rtol=1e-9, atol=1e-14)
    np.testing.assert_allclose(moe.router.bias.grad.numpy(), 0.01 * g.sum(0), rtol=1e-9, atol=1e-14)
