"""RNN, GRU, LSTM (both layouts, all directions, sequence_lens, clip, the spec's activations)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from mfconvert.nn.executor.registry import ints, op


def _activation(name, alpha, beta):
    name = name.lower()
    table = {
        "relu": torch.relu, "tanh": torch.tanh, "sigmoid": torch.sigmoid, "softsign": F.softsign,
        "softplus": F.softplus,
        "affine": lambda x: alpha * x + beta,
        "leakyrelu": lambda x: torch.where(x >= 0, x, alpha * x),
        "thresholdedrelu": lambda x: torch.where(x > alpha, x, torch.zeros_like(x)),
        "scaledtanh": lambda x: alpha * torch.tanh(beta * x),
        "hardsigmoid": lambda x: torch.clamp(alpha * x + beta, 0, 1),
        "elu": lambda x: torch.where(x > 0, x, alpha * torch.expm1(torch.clamp(x, max=0))),
    }
    if name not in table:
        raise ValueError(f"RNN activation '{name}' is not supported by the PyTorch executor")
    return table[name]


_DEFAULT_ALPHA = {"leakyrelu": 0.01, "thresholdedrelu": 1.0, "hardsigmoid": 0.2, "elu": 1.0, "affine": 1.0,
                  "scaledtanh": 1.0}
_DEFAULT_BETA = {"hardsigmoid": 0.5, "affine": 0.0, "scaledtanh": 1.0}


def _activations(a, defaults, dirs):
    names = a.get("activations") or defaults * dirs
    alphas, betas = list(a.get("activation_alpha") or []), list(a.get("activation_beta") or [])
    out = []
    ai = bi = 0
    for name in names:
        low = name.lower()
        alpha = beta = None
        if low in _DEFAULT_ALPHA:
            alpha = alphas[ai] if ai < len(alphas) else _DEFAULT_ALPHA[low]
            ai += 1
        if low in _DEFAULT_BETA:
            beta = betas[bi] if bi < len(betas) else _DEFAULT_BETA[low]
            bi += 1
        out.append(_activation(name, alpha, beta))
    k = len(defaults)
    return [out[d * k:(d + 1) * k] for d in range(dirs)]


def _run(kind, a, x, w, r, b=None, seq_lens=None, h0=None, c0=None, p=None):
    layout = a.get("layout", 0)
    if layout:
        x = x.transpose(0, 1)
    T, B = x.shape[0], x.shape[1]
    H = a.get("hidden_size") or r.shape[-1]
    direction = a.get("direction", "forward")
    dirs = 2 if direction == "bidirectional" else 1
    gates = {"RNN": 1, "GRU": 3, "LSTM": 4}[kind]
    defaults = {"RNN": ["Tanh"], "GRU": ["Sigmoid", "Tanh"], "LSTM": ["Sigmoid", "Tanh", "Tanh"]}[kind]
    acts = _activations(a, defaults, dirs)
    clip = a.get("clip")
    cl = (lambda v: torch.clamp(v, -clip, clip)) if clip else (lambda v: v)
    if h0 is not None and layout:
        h0 = h0.transpose(0, 1)
    if c0 is not None and layout:
        c0 = c0.transpose(0, 1)
    lens = ints(seq_lens) if seq_lens is not None else [T] * B
    lens_t = torch.tensor(lens)
    ys, hs, cs = [], [], []
    for d in range(dirs):
        reverse = direction == "reverse" or d == 1
        Wd, Rd = w[d], r[d]
        Wb = b[d][:gates * H] if b is not None else torch.zeros(gates * H, dtype=x.dtype)
        Rb = b[d][gates * H:] if b is not None else torch.zeros(gates * H, dtype=x.dtype)
        h = h0[d] if h0 is not None else torch.zeros(B, H, dtype=x.dtype)
        c = c0[d] if c0 is not None else torch.zeros(B, H, dtype=x.dtype)
        P = p[d] if p is not None else torch.zeros(3 * H, dtype=x.dtype)
        f = acts[d]
        # Reverse: each sequence reversed within its own length (an involution on [0, L)).
        flip = torch.tensor([[L - 1 - t if t < L else t for L in lens] for t in range(T)])
        xs = x[flip, torch.arange(B)] if reverse else x
        outs = []
        for step in range(T):
            xt = xs[step]
            valid = torch.tensor([step < L for L in lens]).reshape(B, 1)
            gx = xt @ Wd.T + Wb
            if kind == "RNN":
                hn = f[0](cl(gx + h @ Rd.T + Rb))
                cn = c
            elif kind == "GRU":
                gz, gr, gh = gx.split(H, -1)
                Rz, Rr, Rh = Rd.split(H, 0)
                bz, br, bh = Rb.split(H)
                z = f[0](cl(gz + h @ Rz.T + bz))
                rr = f[0](cl(gr + h @ Rr.T + br))
                if a.get("linear_before_reset", 0):
                    hh = f[1](cl(gh + rr * (h @ Rh.T + bh)))
                else:
                    hh = f[1](cl(gh + (rr * h) @ Rh.T + bh))
                hn = (1 - z) * hh + z * h
                cn = c
            else:
                g = gx + h @ Rd.T + Rb
                gi, go, gf, gc = g.split(H, -1)
                pi, po, pf = P.split(H)
                i = f[0](cl(gi + pi * c))
                fg = f[0](cl(gf + pf * c))
                if a.get("input_forget", 0):
                    fg = 1 - i
                ct = f[1](cl(gc))
                cn = fg * c + i * ct
                o = f[0](cl(go + po * cn))
                hn = o * f[2](cn)
            h = torch.where(valid, hn, h)
            c = torch.where(valid, cn, c)
            outs.append(torch.where(valid, hn, torch.zeros_like(hn)))
        y = torch.stack(outs)
        if reverse:
            y = y[flip, torch.arange(B)]
        ys.append(y)
        hs.append(h)
        cs.append(c)
    Y = torch.stack(ys, 1)            # [T, dirs, B, H]
    Yh, Yc = torch.stack(hs), torch.stack(cs)
    if layout:
        Y, Yh, Yc = Y.permute(2, 0, 1, 3), Yh.transpose(0, 1), Yc.transpose(0, 1)
    outs = (Y, Yh, Yc) if kind == "LSTM" else (Y, Yh)
    return outs[:max(a["_nout"], 1)]


op("RNN", 7)(lambda a, x, w, r, b=None, s=None, h0=None: _run("RNN", a, x, w, r, b, s, h0))
op("GRU", 7)(lambda a, x, w, r, b=None, s=None, h0=None: _run("GRU", a, x, w, r, b, s, h0))
op("LSTM", 7)(lambda a, x, w, r, b=None, s=None, h0=None, c0=None, p=None: _run("LSTM", a, x, w, r, b, s, h0, c0, p))
