"""mfconvert.nn.AddLinearAttention: the PyTorch face of the AddLinearAttention op
(docs/ops.md#addlinearattention).

Binarised linear attention after ShiftAddViT: Q and K become {0,1} codes, the product order is
Q_b (K_bᵀ V) (linear in tokens, additions only against V), the result is L2-normalised per head
and a depthwise conv on V restores locality. Two binarisers:
  - "sign": separate Q and K, bit = [x̂ > τ] per channel (τ fitted once as the channel mean);
  - "ksh":  ShiftAddViT's shared qk hashed by kernel-based supervised hashing (KernelSH).
Codes are computed in float64 exactly as the C++ kernel computes them; the gradient is a clipped
straight-through estimate (see the spec).
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

BINARIZERS = ("sign", "ksh")
MASKED_BELOW = -1000.0          # an additive mask value below this masks the key (spec)
NORM_EPS = 1e-12
INV_PI = 1.0 / math.pi


def _ste(value: torch.Tensor, bits: torch.Tensor, passes: torch.Tensor) -> torch.Tensor:
    """`bits` forward; gradient of `value` where `passes`, 0 elsewhere."""
    return bits + (value - value.detach()) * passes.to(value.dtype)


def _normalize64(x: torch.Tensor) -> torch.Tensor:
    """x / ‖x‖ over the last dim in float64 (0 for a zero vector): the codes' arithmetic."""
    x64 = x.detach().double()
    norm = x64.square().sum(-1, keepdim=True).sqrt()
    return torch.where(norm > 0, x64 / torch.where(norm > 0, norm, torch.ones_like(norm)), torch.zeros_like(x64))


def valid_keys(mask: torch.Tensor | None, batch: int, tokens: int) -> torch.Tensor | None:
    """[B, T] bool (True = key counts) from an additive mask [B|1, T] / [B|1, 1, 1, T] or a
    boolean key padding mask [B, T] (True = keep); also from a query × key mask [B|1, 1, T, T] /
    [B|1, T, T] (transformers ≥ 5 expands the padding mask over the queries) whose query rows all
    mask the same keys — ValueError otherwise (a causal mask is not linear attention)."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        keep = mask
    else:
        keep = mask >= MASKED_BELOW
    if keep.dim() == 4:
        if keep.shape[1] != 1 or keep.shape[2] not in (1, tokens):
            raise ValueError(f"mask of shape {tuple(mask.shape)} is not a per-key mask [B, 1, 1, T] "
                             "or a query × key mask [B, 1, T, T]")
        keep = keep[:, 0]
    if keep.dim() == 3:
        if keep.shape[1] not in (1, tokens):
            raise ValueError(f"mask of shape {tuple(mask.shape)} is not a query × key mask [B, T, T]")
        if not bool((keep == keep[:, :1]).all()):
            raise ValueError(f"mask of shape {tuple(mask.shape)} is not per key: its query rows mask different "
                             "keys (a causal or other per-query mask is not linear attention)")
        keep = keep[:, 0]
    if keep.dim() != 2 or keep.shape[-1] != tokens or keep.shape[0] not in (1, batch):
        raise ValueError(f"mask of shape {tuple(mask.shape)} does not fit batch {batch}, tokens {tokens}")
    return keep.expand(batch, tokens)


class SignBinarizer(nn.Module):
    """bit = [x̂ > τ] per channel, separate thresholds for Q and K (buffers [H, D])."""

    def __init__(self, num_heads: int, head_dim: int):
        super().__init__()
        self.register_buffer("q_threshold", torch.zeros(num_heads, head_dim))
        self.register_buffer("k_threshold", torch.zeros(num_heads, head_dim))
        self.register_buffer("fitted", torch.tensor(False))

    @torch.no_grad()
    def fit(self, qh: torch.Tensor, kh: torch.Tensor, keep: torch.Tensor | None) -> None:
        """τ = channel means of the normalised Q and K over the (valid) tokens of this batch."""
        for x, buf in ((qh, self.q_threshold), (kh, self.k_threshold)):
            xn = _normalize64(x)                                     # [B, H, T, D]
            w = torch.ones(xn.shape[0], 1, xn.shape[2], 1, dtype=xn.dtype) if keep is None \
                else keep[:, None, :, None].double()
            buf.copy_(((xn * w).sum((0, 2)) / w.sum((0, 2)).clamp_min(1)).float())
        self.fitted.fill_(True)

    def codes(self, x: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
        """{0,1} float32 [B, H, T, D] with the clipped straight-through gradient."""
        bits = (_normalize64(x) > threshold.double()[None, :, None, :]).float()
        centred = F.normalize(x, dim=-1, eps=NORM_EPS) - threshold[None, :, None, :]
        return _ste(centred, bits, centred.detach().abs() <= 1)


class KSHBinarizer(nn.Module):
    """ShiftAddViT's KernelSH: nbits = [A_h (exp(−‖x̂ − a_i‖²/2σ_h) − μ_i) > 0], fitted once."""

    def __init__(self, num_heads: int, head_dim: int, nbits: int = 16, anchors: int = 25, topk: int = 10,
                 iterations: int = 100, lr: float = 5e-4):
        super().__init__()
        if not 1 <= nbits <= 64:
            raise ValueError(f"nbits must be in [1, 64], got {nbits}")
        self.nbits, self.m, self.topk, self.iterations, self.lr = nbits, anchors, topk, iterations, lr
        self.register_buffer("anchors", torch.zeros(num_heads, anchors, head_dim))
        self.register_buffer("center", torch.zeros(num_heads, anchors))
        self.register_buffer("projection", torch.randn(num_heads, nbits, anchors))
        self.register_buffer("sigma", torch.ones(num_heads))
        self.register_buffer("fitted", torch.tensor(False))

    def kernel(self, xn: torch.Tensor) -> torch.Tensor:
        """Centred Gaussian kernel responses [B, H, T, m] of normalised tokens xn (any float dtype)."""
        a = self.anchors.to(xn.dtype)
        d2 = (xn.unsqueeze(-2) - a[None, :, None]).square().sum(-1)
        gauss = torch.exp(-d2 / (2 * self.sigma.to(xn.dtype))[None, :, None, None])
        return gauss - self.center.to(xn.dtype)[None, :, None]

    @torch.no_grad()
    def fit(self, qk: torch.Tensor, generator: torch.Generator | None = None) -> None:
        """KernelSH.train_hashing_weight_woeig on this batch (ShiftAddViT's first-forward fit)."""
        xn = F.normalize(qk.detach().float(), dim=-1, eps=NORM_EPS)      # [B, H, N, D]
        n = xn.shape[2]
        sim = xn @ xn.transpose(-2, -1)
        k = min(self.topk, n)
        supervision = torch.zeros_like(sim)
        supervision.scatter_(3, sim.topk(k, dim=3).indices, 1.0)
        supervision.scatter_(3, sim.topk(k, dim=3, largest=False).indices, -1.0)
        pick = torch.randint(n, (self.m,), generator=generator) if n < self.m else \
            torch.randperm(n, generator=generator)[: self.m]
        self.anchors.copy_(xn[0][:, pick])
        d2 = (xn.unsqueeze(-2) - self.anchors[None, :, None]).square().sum(-1)
        self.sigma.copy_(d2.mean((0, 2, 3)).clamp_min(1e-12))
        kk = torch.exp(-d2 / (2 * self.sigma)[None, :, None, None])
        self.center.copy_(kk.mean((0, 2)))
        kk = kk - self.center[None, :, None]
        s = supervision * self.nbits

        def loss(y):      # −(yᵀ S y) / (N · nbits), averaged over batch and heads
            return (-(torch.einsum("bhn,bhnl->bhl", y, s) / (n * self.nbits)) * y).sum(-1).mean()

        for r in range(self.nbits):
            a0 = self.projection[:, r, :].clone()
            a = a0.clone().requires_grad_(True)
            opt = torch.optim.SGD([a], lr=self.lr, momentum=0.9, nesterov=True)
            with torch.enable_grad():
                for _ in range(self.iterations):
                    y = 2 * torch.sigmoid(torch.einsum("bhnm,hm->bhn", kk, a)) - 1
                    opt.zero_grad()
                    loss(y).backward()
                    opt.step()
            a = a.detach()
            y0 = torch.where(torch.einsum("bhnm,hm->bhn", kk, a0) > 0, 1.0, -1.0)
            y1 = torch.where(torch.einsum("bhnm,hm->bhn", kk, a) > 0, 1.0, -1.0)
            better = bool(torch.isfinite(a).all()) and loss(y1) < loss(y0)
            self.projection[:, r, :] = a if better else a0
            y = y1 if better else y0
            s = s - torch.einsum("bhn,bhm->bhnm", y, y)
        self.fitted.fill_(True)

    def codes(self, x: torch.Tensor) -> torch.Tensor:
        """{0,1} float32 [B, H, T, nbits]; gradient passes where 0 < y < 1 (BinaryQuantizer)."""
        y64 = self.kernel(_normalize64(x)) @ self.projection.double().transpose(-2, -1)[None]
        bits = (y64 > 0).float()
        y = self.kernel(F.normalize(x, dim=-1, eps=NORM_EPS)) @ self.projection.transpose(-2, -1)[None]
        return _ste(y, bits, (y.detach() > 0) & (y.detach() < 1))


def depthwise_conv(v: torch.Tensor, weight: torch.Tensor, grid: tuple[int, int] | None,
                   prefix_tokens: int) -> torch.Tensor:
    """conv(V') of the spec on head layout v [B, H, T, D]; weight [H, k] or [H, kh, kw]."""
    b, h, t, d = v.shape
    if weight.dim() == 2:
        k = weight.shape[1]
        return F.conv2d(v, weight[:, None, :, None], padding=(k // 2, 0), groups=h)
    kh, kw = weight.shape[1:]
    gh, gw = grid
    if t != prefix_tokens + gh * gw:
        raise ValueError(f"{t} tokens do not form {prefix_tokens} prefix tokens + a {gh}×{gw} grid")
    img = v[:, :, prefix_tokens:].reshape(b, h, gh, gw, d).permute(0, 4, 1, 2, 3).reshape(b * d, h, gh, gw)
    out = F.conv2d(img, weight[:, None], padding=(kh // 2, kw // 2), groups=h)
    out = out.reshape(b, d, h, gh, gw).permute(0, 2, 3, 4, 1).reshape(b, h, gh * gw, d)
    prefix = v[:, :, :prefix_tokens] * weight[:, kh // 2, kw // 2][None, :, None, None]
    return torch.cat([prefix, out], dim=2)


class AddLinearAttention(nn.Module):
    """Multi-head self-attention with a binarised, addition-only core (docs/ops.md).

    forward(x [B, T, C], mask=None) → [B, T, C]; `mask` is an additive mask ([B|1, T] or
    [B|1, 1, 1, T], < −1000 = masked) or a boolean key padding mask [B, T] (True = keep), or
    either expanded over the queries ([B|1, 1, T, T], every query row the same keys).
    """

    def __init__(self, dim: int, num_heads: int, *, binarizer: str = "sign", conv: str | None = "tokens",
                 conv_kernel: int = 9, grid: tuple[int, int] | None = None, prefix_tokens: int = 0,
                 qkv_bias: bool = True, nbits: int = 16, anchors: int = 25, topk: int = 10,
                 projections: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        if binarizer not in BINARIZERS:
            raise ValueError(f"binarizer must be one of {BINARIZERS}, got {binarizer!r}")
        if conv not in (None, "tokens", "grid"):
            raise ValueError(f"conv must be None, 'tokens' or 'grid', got {conv!r}")
        if conv == "grid" and grid is None:
            raise ValueError("conv='grid' needs grid=(rows, cols)")
        self.dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads
        self.binarizer_name, self.grid, self.prefix_tokens = binarizer, grid, prefix_tokens
        # projections=False: only the op's core (the ONNX executor, whose graph holds the projections).
        self.q = nn.Linear(dim, dim, bias=qkv_bias) if projections else None
        self.k = nn.Linear(dim, dim, bias=qkv_bias) if projections and binarizer == "sign" else None   # ksh: shared qk
        self.v = nn.Linear(dim, dim, bias=qkv_bias) if projections else None
        self.proj = nn.Linear(dim, dim) if projections else None
        self.binarizer = SignBinarizer(num_heads, self.head_dim) if binarizer == "sign" else \
            KSHBinarizer(num_heads, self.head_dim, nbits, anchors, topk)
        if conv is None:
            self.conv_weight = None
        else:
            shape = (num_heads, conv_kernel) if conv == "tokens" else (num_heads, 3, 3)
            # Zero: the layer starts as pure binarised linear attention; finetuning grows locality.
            self.conv_weight = nn.Parameter(torch.zeros(shape))

    @classmethod
    def from_linears(cls, q: nn.Linear, k: nn.Linear, v: nn.Linear, proj: nn.Linear, num_heads: int,
                     **kwargs) -> "AddLinearAttention":
        """Initialised from a softmax attention's projections (ksh: the shared qk starts as Q's)."""
        layer = cls(q.in_features, num_heads, qkv_bias=q.bias is not None, **kwargs)
        pairs = [(layer.q, q), (layer.v, v), (layer.proj, proj)] + ([(layer.k, k)] if layer.k is not None else [])
        with torch.no_grad():
            for dst, src in pairs:
                dst.weight.copy_(src.weight)
                if dst.bias is not None:
                    dst.bias.copy_(src.bias if src.bias is not None else torch.zeros_like(dst.bias))
        return layer

    @classmethod
    def from_fused_qkv(cls, qkv: nn.Linear, proj: nn.Linear, num_heads: int, **kwargs) -> "AddLinearAttention":
        """From a timm-style attention (one qkv Linear [3C, C], rows q | k | v)."""
        c = proj.in_features
        parts = []
        for i in range(3):
            lin = nn.Linear(c, c, bias=qkv.bias is not None)
            with torch.no_grad():
                lin.weight.copy_(qkv.weight[i * c:(i + 1) * c])
                if qkv.bias is not None:
                    lin.bias.copy_(qkv.bias[i * c:(i + 1) * c])
            parts.append(lin)
        return cls.from_linears(*parts, proj, num_heads, **kwargs)

    # -- the op's core ----------------------------------------------------------------------
    def heads(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        return x.reshape(b, t, self.num_heads, self.head_dim).transpose(1, 2)

    def core(self, q: torch.Tensor, k: torch.Tensor | None, v: torch.Tensor,
             mask: torch.Tensor | None = None) -> torch.Tensor:
        """The AddLinearAttention op: Q, K (None for ksh), V [B, T, C] → Y [B, T, C]."""
        b, t, c = v.shape
        keep = valid_keys(mask, b, t)
        qh, vh = self.heads(q), self.heads(v)
        kh = qh if k is None else self.heads(k)
        if not bool(self.binarizer.fitted):
            if self.binarizer_name == "sign":
                self.binarizer.fit(qh, kh, keep)
            else:
                self.binarizer.fit(qh)
        if self.binarizer_name == "sign":
            qb = self.binarizer.codes(qh, self.binarizer.q_threshold)
            kb = self.binarizer.codes(kh, self.binarizer.k_threshold)
        else:
            qb = kb = self.binarizer.codes(qh)
        if keep is not None:
            kb = kb * keep[:, None, :, None].to(kb.dtype)
            vh_masked = vh * keep[:, None, :, None].to(vh.dtype)
        else:
            vh_masked = vh
        s = kb.transpose(-2, -1) @ vh                                  # [B, H, bits, D]
        z = 0.5 * vh + (qb @ s) * INV_PI
        y = z / z.norm(dim=-1, keepdim=True).clamp_min(NORM_EPS)
        if self.conv_weight is not None:
            y = y + depthwise_conv(vh_masked, self.conv_weight, self.grid, self.prefix_tokens)
        return y.transpose(1, 2).reshape(b, t, c)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.q is None:
            raise RuntimeError("this AddLinearAttention holds only the op's core: call core(q, k, v, mask)")
        q = self.q(x)
        k = None if self.k is None else self.k(x)
        return self.proj(self.core(q, k, self.v(x), mask))

    # -- ONNX -------------------------------------------------------------------------------
    @classmethod
    def from_onnx(cls, channels: int, attrs: dict, constants: dict[int, np.ndarray],
                  key_input: bool = True) -> "AddLinearAttention":
        """The op's core from an AddLinearAttention node: its attributes and its constant inputs
        by index (the inverse of onnx_attributes / onnx_constants). Absent thresholds are 0 and
        count as fitted, so the layer computes exactly what the node computes."""
        binarizer = attrs.get("binarizer", "sign")
        if isinstance(binarizer, bytes):
            binarizer = binarizer.decode()
        heads = attrs["num_heads"]
        conv = constants.get(4)
        kwargs = {}
        if binarizer == "ksh":
            if key_input:
                raise ValueError("the ksh binariser shares Q and K: the node must not have a K input")
            missing = [i for i in (7, 8, 9, 10) if i not in constants]
            if missing:
                raise ValueError(f"ksh binariser without hash inputs {missing}")
            kwargs = dict(nbits=constants[9].shape[1], anchors=constants[7].shape[1])
        grid = (attrs.get("grid_h", 0), attrs.get("grid_w", 0))
        layer = cls(channels, heads, binarizer=binarizer, projections=False,
                    conv=None if conv is None else "tokens" if conv.ndim == 2 else "grid",
                    conv_kernel=conv.shape[-1] if conv is not None else 9,
                    grid=grid if conv is not None and conv.ndim == 3 else None,
                    prefix_tokens=attrs.get("prefix_tokens", 0), **kwargs)
        bz = layer.binarizer
        with torch.no_grad():
            if conv is not None:
                layer.conv_weight.copy_(torch.from_numpy(np.array(conv, np.float32)))
            if binarizer == "sign":
                for index, buf in ((5, bz.q_threshold), (6, bz.k_threshold)):
                    if index in constants:
                        buf.copy_(torch.from_numpy(np.array(constants[index], np.float32)).reshape(buf.shape))
            else:
                for index, buf in ((7, bz.anchors), (8, bz.center), (9, bz.projection), (10, bz.sigma)):
                    buf.copy_(torch.from_numpy(np.array(constants[index], np.float32)).reshape(buf.shape))
            bz.fitted.fill_(True)
        return layer

    def add_conv(self, kind: str = "tokens", kernel: int = 9, grid: tuple[int, int] | None = None,
                 prefix_tokens: int = 0) -> None:
        """Give a layer without a conv a zero-initialised one (the function is unchanged until
        training moves it): ShiftAddViT's depthwise conv on V, which restores locality."""
        if self.conv_weight is not None:
            return
        if kind not in ("tokens", "grid") or (kind == "grid" and grid is None):
            raise ValueError(f"conv must be 'tokens' or 'grid' with a grid, got {kind!r}, grid={grid}")
        shape = (self.num_heads, kernel) if kind == "tokens" else (self.num_heads, 3, 3)
        self.grid, self.prefix_tokens = grid, prefix_tokens
        self.conv_weight = nn.Parameter(torch.zeros(shape, device=self.binarizer.fitted.device))

    def onnx_attributes(self) -> dict:
        attrs = {"num_heads": self.num_heads, "binarizer": self.binarizer_name}
        if self.conv_weight is not None and self.conv_weight.dim() == 3:
            attrs.update(grid_h=self.grid[0], grid_w=self.grid[1], prefix_tokens=self.prefix_tokens)
        return attrs

    def onnx_constants(self) -> dict[int, np.ndarray]:
        """The op's constant inputs by index (4: conv, 5–6: sign thresholds, 7–10: ksh hash)."""
        out = {}
        if self.conv_weight is not None:
            out[4] = self.conv_weight.detach().numpy().astype(np.float32)
        bz = self.binarizer
        if self.binarizer_name == "sign":
            out[5], out[6] = bz.q_threshold.numpy().copy(), bz.k_threshold.numpy().copy()
        else:
            out.update({7: bz.anchors.numpy().copy(), 8: bz.center.numpy().copy(),
                        9: bz.projection.numpy().copy(), 10: bz.sigma.numpy().copy()})
        return out

    def extra_repr(self) -> str:
        conv = None if self.conv_weight is None else tuple(self.conv_weight.shape)
        return f"{self.dim}, heads={self.num_heads}, binarizer={self.binarizer_name}, conv={conv}"
