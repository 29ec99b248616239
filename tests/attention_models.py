"""Small attention models written as code for the add-attention tests: a timm-style ViT (timm
itself needs torchvision, which has no working CPU build on our package index) and a BERT-style
self-attention block as Hugging Face writes it (separate Q/K/V, additive padding mask)."""
from __future__ import annotations

import math

import torch
from torch import nn


class TimmAttention(nn.Module):
    """timm.models.vision_transformer.Attention (fused_attn=False): one qkv Linear,
    reshape(B, N, 3, H, D).permute(2, 0, 3, 1, 4), unbind, q*scale @ kᵀ, softmax, @ v, proj."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, sdpa: bool = False):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.sdpa = sdpa
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        if self.sdpa:
            x = nn.functional.scaled_dot_product_attention(q, k, v)
        else:
            q = q * self.scale
            attn = (q @ k.transpose(-2, -1)).softmax(dim=-1)
            x = attn @ v
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


class Block(nn.Module):
    def __init__(self, dim, heads, sdpa=False):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = TimmAttention(dim, heads, sdpa=sdpa)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TinyViT(nn.Module):
    """Patch embedding (Conv2d), class token, position embedding, `depth` timm blocks, head."""

    def __init__(self, image=32, patch=8, dim=48, heads=3, depth=2, classes=10, sdpa=False):
        super().__init__()
        self.patch = nn.Conv2d(3, dim, patch, patch)
        tokens = (image // patch) ** 2 + 1
        self.cls = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos = nn.Parameter(torch.randn(1, tokens, dim) * 0.02)
        self.blocks = nn.Sequential(*[Block(dim, heads, sdpa) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, img):
        x = self.patch(img).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0])


class BertSelfAttention(nn.Module):
    """HF BertSelfAttention + BertSelfOutput's dense (eager): separate Q/K/V, view + permute,
    scores / sqrt(D), + additive mask, softmax, @ v, permute, view, output dense."""

    def __init__(self, dim=64, heads=4):
        super().__init__()
        self.h, self.d = heads, dim // heads
        self.query, self.key, self.value = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.dense = nn.Linear(dim, dim)

    def split(self, x):
        b, t, _ = x.shape
        return x.view(b, t, self.h, self.d).permute(0, 2, 1, 3)

    def forward(self, x, attention_mask):
        additive = (1.0 - attention_mask[:, None, None, :].to(x.dtype)) * torch.finfo(x.dtype).min
        q, k, v = self.split(self.query(x)), self.split(self.key(x)), self.split(self.value(x))
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.d) + additive
        ctx = scores.softmax(-1) @ v
        b, _, t, _ = ctx.shape
        return self.dense(ctx.permute(0, 2, 1, 3).contiguous().view(b, t, self.h * self.d))


def swap_hf_attention_cores(bert: nn.Module, query_key_mask: bool = False) -> nn.Module:
    """In place, replace each self-attention core of a Hugging Face BertModel (`bert.encoder.layer`)
    by AddLinearAttention.core (sign codes, zero thresholds, no conv): the PyTorch model that a
    graph converted by the add-attention pass stands for. `query_key_mask` asserts that the core
    receives the [B, 1, T, T] mask transformers 5 builds."""
    from mfconvert.nn import AddLinearAttention

    for layer in bert.encoder.layer:
        att = layer.attention
        new = AddLinearAttention.from_linears(att.self.query, att.self.key, att.self.value, att.output.dense,
                                              bert.config.num_attention_heads, conv=None)
        new.binarizer.fitted.fill_(True)

        def self_forward(hidden, attention_mask=None, *args, _new=new, **kwargs):
            if query_key_mask:
                assert attention_mask is not None and attention_mask.shape[-2:] == (hidden.shape[1],) * 2
            return _new.core(_new.q(hidden), _new.k(hidden), _new.v(hidden), attention_mask), None
        att.self.forward = self_forward
    return bert


def export(model: nn.Module, args: tuple, path, *, dynamo: bool, opset: int, input_names, dynamic_axes=None):
    """torch.onnx.export with either exporter; returns the path."""
    import warnings
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            torch.onnx.export(model, args, str(path), dynamo=True, opset_version=opset,
                              input_names=list(input_names), optimize=True, verbose=False)
        else:
            torch.onnx.export(model, args, str(path), dynamo=False, opset_version=opset,
                              input_names=list(input_names), dynamic_axes=dynamic_axes)
    return path
