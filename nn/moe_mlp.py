"""mfconvert.nn.ShiftMoEMLP: the PyTorch face of the ShiftMoEMLP block (docs/ops.md#shiftmoemlp).

A router sends each token to the original float MLP (Mult expert) or to its power-of-two copy
(Shift expert). Unlike ShiftAddViT's released code, the gate is the chosen expert's softmax
probability, so the router gets gradients, and the latency-aware balancing loss is really
computed: `forward` stores it in `.aux_loss` for the training loop to add to its objective.
"""
from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mfconvert.nn.shift_linear import ShiftLinear

MULT, SHIFT = 0, 1
# µs per token of the dense MLP and of its ShiftLinear copy in ORT, 2 threads on the 2-core Zen 5
# (bench/bench_moe_mlp.py, 197 tokens, 192→768→192; BENCHMARKS.md "MoE MLP"): the balanced target
# is then 39 % of tokens to Shift. Only the ratio matters.
DEFAULT_LATENCY = (2.8, 4.4)
BALANCE_COEF = 0.01


def router_init(in_features: int, router_std: float, router_bias: float,
                seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(W_r [2, d], b_r [2]) float32, as docs/ops.md states, so the pass and the layer agree."""
    normal = np.random.default_rng(seed).standard_normal((2, in_features))
    weight = (router_std / np.sqrt(in_features) * normal).astype(np.float32)
    return weight, np.array([0.0, router_bias], dtype=np.float32)


def cv_squared(v: torch.Tensor) -> torch.Tensor:
    """Squared coefficient of variation (population variance), 0 when all entries are equal."""
    return v.var(unbiased=False) / (v.mean() ** 2 + 1e-10)


def balance_loss(probs: torch.Tensor, expert: torch.Tensor, latency: torch.Tensor) -> torch.Tensor:
    """cv²(τ·importance) + cv²(τ·load); load is the token count with importance's gradient."""
    importance = probs.sum(0)
    hard = F.one_hot(expert, probs.shape[1]).to(probs.dtype)
    load = (hard + probs - probs.detach()).sum(0)
    return cv_squared(latency * importance) + cv_squared(latency * load)


def balance_loss_from_logits(logits: torch.Tensor, latency: torch.Tensor) -> torch.Tensor:
    """balance_loss of a block's router logits [R, 2] (the ONNX form's Gemm output); 0 for R = 0."""
    logits = logits.reshape(-1, logits.shape[-1])
    if not logits.shape[0]:
        return logits.sum()
    return balance_loss(logits.softmax(-1), logits.argmax(-1), latency.to(logits.device, logits.dtype))


class ShiftMoEMLP(nn.Module):
    """y = g · E_e(x) per token, e = argmax of a 2-logit router, g its softmax probability.

    After each forward pass `.aux_loss` holds the balancing loss (already times `balance_coef`;
    zero in eval mode) and `.last_split` the tokens per expert as (mult, shift).
    """

    def __init__(self, router: nn.Linear, mult: nn.Module, shift: nn.Module,
                 latency: tuple[float, float] = DEFAULT_LATENCY, balance_coef: float = BALANCE_COEF):
        super().__init__()
        if router.out_features != 2:
            raise ValueError(f"the router must give 2 logits, got {router.out_features}")
        if min(latency) <= 0:
            raise ValueError(f"expert latencies must be positive, got {latency}")
        self.router, self.experts = router, nn.ModuleList([mult, shift])
        self.register_buffer("latency", torch.tensor(latency, dtype=torch.float32))
        self.balance_coef = balance_coef
        self.aux_loss = torch.zeros(())
        self.last_split = (0, 0)

    @classmethod
    def from_mlp(cls, fc1: nn.Linear, act: nn.Module, fc2: nn.Linear, *, weight_bits: int = 5,
                 act_bits: int = 32, act_frac_bits: int = 16, weight_scale: str = "channel", terms: int = 1,
                 mode: str = "Q", router_std: float = 10.0, router_bias: float = 0.0, seed: int = 0,
                 latency: tuple[float, float] = DEFAULT_LATENCY,
                 balance_coef: float = BALANCE_COEF) -> "ShiftMoEMLP":
        """The block the `moe-mlp` pass makes of fc1 → act → fc2 (copies; the MLP is untouched)."""
        fmt = dict(weight_bits=weight_bits, act_bits=act_bits, act_frac_bits=act_frac_bits,
                   weight_scale=weight_scale, terms=terms, mode=mode)
        mult = nn.Sequential(copy.deepcopy(fc1), copy.deepcopy(act), copy.deepcopy(fc2))
        shift = nn.Sequential(ShiftLinear.from_linear(fc1, **fmt), copy.deepcopy(act),
                              ShiftLinear.from_linear(fc2, **fmt))
        router = nn.Linear(fc1.in_features, 2)
        weight, bias = router_init(fc1.in_features, router_std, router_bias, seed)
        with torch.no_grad():
            router.weight.copy_(torch.from_numpy(weight))
            router.bias.copy_(torch.from_numpy(bias))
        return cls(router, mult, shift, latency, balance_coef)

    def route(self, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(softmax probabilities [R, 2], chosen expert [R]) for tokens x2 [R, d]."""
        logits = self.router(x2)
        return logits.softmax(-1), logits.argmax(-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        probs, expert = self.route(x2)
        gate = probs.gather(1, expert.unsqueeze(1))
        out_features = self.experts[MULT][-1].out_features
        out = x2.new_zeros(x2.shape[0], out_features)
        for k, module in enumerate(self.experts):
            rows = (expert == k).nonzero().squeeze(1)
            if rows.numel():
                out = out.index_copy(0, rows, module(x2[rows]))
        counts = torch.bincount(expert, minlength=2).tolist()
        self.last_split = (counts[MULT], counts[SHIFT])
        self.aux_loss = (self.balance_coef * balance_loss(probs, expert, self.latency)
                         if self.training else x2.new_zeros(()))
        return (out * gate).reshape(*x.shape[:-1], out_features)

    def target_shift_fraction(self) -> float:
        """The split where latency-weighted loads are equal: τ_mult / (τ_mult + τ_shift)."""
        mult, shift = self.latency.tolist()
        return mult / (mult + shift)
