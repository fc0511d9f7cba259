"""DeCLIP: CLIP plus image self-supervision, text MLM, multi-view and nearest-neighbour supervision.

One file holds the model and everything that belongs to it: the configuration and presets, the
image towers (ModifiedResNet, ViT), the causal text Transformer, the DeCLIP heads and memory bank,
the objective with its distributed contrastive gather, feature taps for distillation defenses,
optimizer parameter groups, a FLOP estimate for MFU, and checkpoint I/O for our own safetensors
files, the official DeCLIP `.pth.tar`, OpenAI CLIP `.pt`, open_clip state dicts and transformers CLIP
directories, and export to the open_clip and transformers layouts
(`python modeling_declip.py export CKPT --to open_clip|transformers OUT`).

Facts and formulas follow the re-implementation spec (shared/reference/declip_spec.md, cited as
"spec §x"), itself read from Sense-GVT/DeCLIP and JWLiang007/BD_DeCLIP and the DeCLIP paper
(Li et al., ICLR 2022, arXiv 2110.05208).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import io
import math
import os
import pickletools
import re
import sys
import zipfile
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from data_declip import (CLIP_MEAN, CLIP_STD, EOT_ID, IMAGENET_MEAN, IMAGENET_STD, MASK_ID,  # noqa: F401
                         SOT_ID, UserError, atomic_write, run_main)

# DeCLIP's vocabulary: OpenAI's 49,406 BPE ids, then <|mask|>, <|startoftext|>, <|endoftext|> (spec §1.3).
VOCAB_SIZE = 49409
OPENAI_SOT_ID, OPENAI_EOT_ID = 49406, 49407
FORMAT_TAG = "declip-bd/1"
# MLP activation of the Transformers: QuickGELU (OpenAI, DeCLIP) or exact GELU (open_clip's default).
ACTIVATIONS = ("quick_gelu", "gelu")
# torch.load(weights_only=True) can be made to run code before 2.6 (CVE-2025-32434) and to corrupt
# memory before 2.10 (CVE-2026-24747): foreign pickles are refused on older versions.
SAFE_TORCH_LOAD = (2, 10)


class CheckpointError(UserError):
    """A checkpoint that cannot be read as asked (unknown format, unsafe pickle, wrong preset)."""


# ----------------------------------------------------------------------------------------------
# Configuration and presets


@dataclass
class DeCLIPConfig:
    # image tower
    vision: str = "resnet"  # "resnet" (OpenAI ModifiedResNet) or "vit"
    vision_layers: Tuple[int, ...] = (3, 4, 6, 3)  # ResNet blocks per stage; ViT: (depth,)
    vision_width: int = 64  # ResNet stem width; ViT: token width
    vision_heads: int = 32  # attention-pool heads (ResNet) or ViT heads
    patch_size: int = 32  # ViT only
    image_size: int = 224
    embed_dim: int = 1024  # joint embedding
    # text tower
    context_length: int = 77
    vocab_size: int = VOCAB_SIZE
    text_width: int = 512
    text_layers: int = 12
    text_heads: int = 8
    act: str = "quick_gelu"  # MLP activation of both Transformers, one of ACTIVATIONS
    # DeCLIP heads (spec §1.5, §1.6)
    proj_dim: int = 0  # SimSiam projector hidden/out dim; 0 = embed_dim
    pred_dim: int = 0  # SimSiam predictor bottleneck; 0 = proj_dim // 2
    nn_size: int = 65536  # text memory bank rows
    # preprocessing the weights expect
    image_mean: Tuple[float, float, float] = IMAGENET_MEAN
    image_std: Tuple[float, float, float] = IMAGENET_STD
    grad_checkpointing: bool = False

    def __post_init__(self):
        self.vision_layers = tuple(int(x) for x in self.vision_layers)
        self.image_mean = tuple(float(x) for x in self.image_mean)
        self.image_std = tuple(float(x) for x in self.image_std)
        if self.vision not in ("resnet", "vit"):
            raise ValueError(f"vision must be 'resnet' or 'vit', not {self.vision!r}")
        if self.act not in ACTIVATIONS:
            raise ValueError(f"act must be one of {', '.join(ACTIVATIONS)}, not {self.act!r}")

    @property
    def proj_dim_(self) -> int:
        return self.proj_dim or self.embed_dim

    @property
    def pred_dim_(self) -> int:
        return self.pred_dim or self.proj_dim_ // 2

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "DeCLIPConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


PRESETS: Dict[str, dict] = {
    # Spec §1.2-1.3: the model of the original study.
    "rn50": dict(vision="resnet", vision_layers=(3, 4, 6, 3), vision_width=64, vision_heads=32,
                 image_size=224, embed_dim=1024, text_width=512, text_layers=12, text_heads=8),
    # OpenAI RN101 shapes (embed 512), DeCLIP heads on top.
    "rn101": dict(vision="resnet", vision_layers=(3, 4, 23, 3), vision_width=64, vision_heads=32,
                  image_size=224, embed_dim=512, text_width=512, text_layers=12, text_heads=8),
    # OpenAI ViT-B/32 shapes.
    "vitb32": dict(vision="vit", vision_layers=(12,), vision_width=768, vision_heads=12, patch_size=32,
                   image_size=224, embed_dim=512, text_width=512, text_layers=12, text_heads=8),
    # Small enough to train at hundreds of images/s on a 2-core CPU at 32 px (DESIGN.md facts).
    "tiny": dict(vision="resnet", vision_layers=(1, 1, 1, 1), vision_width=32, vision_heads=16,
                 image_size=32, embed_dim=256, context_length=32, text_width=128, text_layers=2,
                 text_heads=2, nn_size=8192),
    "tiny-vit": dict(vision="vit", vision_layers=(4,), vision_width=128, vision_heads=2, patch_size=4,
                     image_size=32, embed_dim=256, context_length=32, text_width=128, text_layers=2,
                     text_heads=2, nn_size=8192),
}


def get_config(preset_or_config: Union[str, dict, DeCLIPConfig], **overrides) -> DeCLIPConfig:
    """A config from a preset name, a dict or a config, with field overrides applied."""
    if isinstance(preset_or_config, DeCLIPConfig):
        base = preset_or_config.to_dict()
    elif isinstance(preset_or_config, dict):
        base = dict(preset_or_config)
    elif preset_or_config in PRESETS:
        base = dict(PRESETS[preset_or_config])
    else:
        raise ValueError(f"unknown model preset {preset_or_config!r}; choose one of {', '.join(PRESETS)}")
    base.update({k: v for k, v in overrides.items() if v is not None})
    return DeCLIPConfig.from_dict(base)


# ----------------------------------------------------------------------------------------------
# Building blocks


class QuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


def attention(q, k, v, causal: bool = False):
    """Scaled dot-product attention over (B, heads, N, d). Fused SDPA kernels on GPUs; on the CPU an
    explicit softmax(QK^T)V, which is 3-6x faster than the CPU flash kernel for the short sequences
    here (32 text tokens, 2-50 pooling tokens; measured with bf16 autocast on 2 cores)."""
    if q.is_cuda:
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    s = (q * q.shape[-1] ** -0.5) @ k.transpose(-1, -2)
    if causal:
        n = q.shape[-2]
        s = s.masked_fill(torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    return s.softmax(dim=-1) @ v


class SelfAttention(nn.Module):
    """Multi-head attention with nn.MultiheadAttention's parameter layout (packed in_proj), so
    OpenAI/open_clip/DeCLIP weights load unchanged, computed with scaled_dot_product_attention."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)

    def forward(self, x, causal: bool = False):
        b, n, w = x.shape
        q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).split(w, dim=-1)
        q, k, v = (t.view(b, n, self.heads, w // self.heads).transpose(1, 2) for t in (q, k, v))
        y = attention(q, k, v, causal)
        return self.out_proj(y.transpose(1, 2).reshape(b, n, w))


class ResidualBlock(nn.Module):
    """Pre-LN Transformer block with a QuickGELU (spec §1.3) or exact GELU MLP."""

    def __init__(self, width: int, heads: int, act: str = "quick_gelu"):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = SelfAttention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential()
        self.mlp.add_module("c_fc", nn.Linear(width, 4 * width))
        self.mlp.add_module("gelu", QuickGELU() if act == "quick_gelu" else nn.GELU())
        self.mlp.add_module("c_proj", nn.Linear(4 * width, width))

    def forward(self, x, causal: bool = False):
        x = x + self.attn(self.ln_1(x), causal=causal)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, causal: bool, grad_checkpointing: bool = False,
                 act: str = "quick_gelu"):
        super().__init__()
        self.causal = causal
        self.grad_checkpointing = grad_checkpointing
        self.resblocks = nn.ModuleList(ResidualBlock(width, heads, act) for _ in range(layers))

    def forward(self, x):
        for block in self.resblocks:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(block, x, self.causal, use_reentrant=False)
            else:
                x = block(x, causal=self.causal)
        return x


def resize_pos_embed(pos: torch.Tensor, new_grid: int, extra_tokens: int = 1) -> torch.Tensor:
    """Bicubically resize a (extra + g*g, C) positional embedding to a new_grid x new_grid grid."""
    old_grid = int(round(math.sqrt(pos.shape[0] - extra_tokens)))
    if old_grid == new_grid:
        return pos
    head, grid = pos[:extra_tokens], pos[extra_tokens:]
    grid = grid.reshape(1, old_grid, old_grid, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid.float(), size=(new_grid, new_grid), mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(new_grid * new_grid, -1).to(pos.dtype)
    return torch.cat([head, grid], dim=0)


# ----------------------------------------------------------------------------------------------
# Image towers


class Bottleneck(nn.Module):
    """ResNet bottleneck with anti-aliased (avg-pool) downsampling (spec §1.2)."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.avgpool = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride > 1 or inplanes != planes * 4:
            self.downsample = nn.Sequential()
            self.downsample.add_module("-1", nn.AvgPool2d(stride))
            self.downsample.add_module("0", nn.Conv2d(inplanes, planes * 4, 1, bias=False))
            self.downsample.add_module("1", nn.BatchNorm2d(planes * 4))

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(self.avgpool(out)))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class AttentionPool2d(nn.Module):
    """Mean token + spatial tokens, one multi-head attention, output the mean token's row.
    The positional embedding is interpolated to the input's grid, so any resolution works
    (the original silently fell back to an untrained `fc` head off 224 px: spec §8 item 14)."""

    def __init__(self, grid: int, embed_dim: int, heads: int, output_dim: int):
        super().__init__()
        self.positional_embedding = nn.Parameter(torch.randn(grid * grid + 1, embed_dim) / embed_dim ** 0.5)
        self.q_proj = nn.Linear(embed_dim, embed_dim)
        self.k_proj = nn.Linear(embed_dim, embed_dim)
        self.v_proj = nn.Linear(embed_dim, embed_dim)
        self.c_proj = nn.Linear(embed_dim, output_dim)
        self.heads = heads

    def forward(self, x):
        b, c, h, w = x.shape
        x = x.flatten(2).transpose(1, 2)  # B, HW, C (row-major)
        x = torch.cat([x.mean(dim=1, keepdim=True), x], dim=1)
        pos = self.positional_embedding
        if h != w:
            raise ValueError(f"AttentionPool2d expects a square feature map, got {h}x{w}")
        pos = resize_pos_embed(pos, h)
        x = x + pos.to(x.dtype)
        q = self.q_proj(x[:, :1])
        k, v = self.k_proj(x), self.v_proj(x)
        d = c // self.heads
        q = q.view(b, 1, self.heads, d).transpose(1, 2)
        k = k.view(b, -1, self.heads, d).transpose(1, 2)
        v = v.view(b, -1, self.heads, d).transpose(1, 2)
        y = attention(q, k, v).transpose(1, 2).reshape(b, c)
        return self.c_proj(y)


class ModifiedResNet(nn.Module):
    """OpenAI CLIP's ModifiedResNet, with the same module names (spec §1.2)."""

    def __init__(self, layers: Sequence[int], output_dim: int, heads: int, image_size: int, width: int):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width // 2, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width // 2)
        self.conv2 = nn.Conv2d(width // 2, width // 2, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width // 2)
        self.conv3 = nn.Conv2d(width // 2, width, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(width)
        self.avgpool = nn.AvgPool2d(2)
        self.relu = nn.ReLU(inplace=True)
        self._inplanes = width
        self.layer1 = self._make_layer(width, layers[0])
        self.layer2 = self._make_layer(width * 2, layers[1], stride=2)
        self.layer3 = self._make_layer(width * 4, layers[2], stride=2)
        self.layer4 = self._make_layer(width * 8, layers[3], stride=2)
        self.attnpool = AttentionPool2d(max(image_size // 32, 1), width * 32, heads, output_dim)

    def _make_layer(self, planes, blocks, stride=1):
        mods = [Bottleneck(self._inplanes, planes, stride)]
        self._inplanes = planes * 4
        mods += [Bottleneck(self._inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*mods)

    def forward(self, x):
        x = x.to(self.conv1.weight.dtype)
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.relu(self.bn2(self.conv2(x)))
        x = self.avgpool(self.relu(self.bn3(self.conv3(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.attnpool(x)


class VisionTransformer(nn.Module):
    """OpenAI CLIP's ViT, with the same parameter names (class token, ln_pre/ln_post, `proj`)."""

    def __init__(self, image_size: int, patch_size: int, width: int, layers: int, heads: int,
                 output_dim: int, grad_checkpointing: bool = False, act: str = "quick_gelu"):
        super().__init__()
        self.patch_size = patch_size
        grid = image_size // patch_size
        scale = width ** -0.5
        self.conv1 = nn.Conv2d(3, width, patch_size, stride=patch_size, bias=False)
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(grid * grid + 1, width))
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = Transformer(width, layers, heads, causal=False, grad_checkpointing=grad_checkpointing,
                                       act=act)
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, output_dim))

    def forward(self, x):
        x = self.conv1(x.to(self.conv1.weight.dtype))
        b, c, h, w = x.shape
        x = x.flatten(2).transpose(1, 2)
        cls = self.class_embedding.to(x.dtype).expand(b, 1, c)
        x = torch.cat([cls, x], dim=1)
        x = x + resize_pos_embed(self.positional_embedding, h).to(x.dtype)
        x = self.transformer(self.ln_pre(x))
        return self.ln_post(x[:, 0]) @ self.proj


# ----------------------------------------------------------------------------------------------
# Text tower


class TextTransformer(nn.Module):
    """Causal pre-LN Transformer, EOT pooling (argmax token id), Linear projection with bias (spec §1.3)."""

    def __init__(self, cfg: DeCLIPConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.text_width)
        self.positional_embedding = nn.Parameter(torch.empty(cfg.context_length, cfg.text_width))
        self.transformer = Transformer(cfg.text_width, cfg.text_layers, cfg.text_heads, causal=True,
                                       grad_checkpointing=cfg.grad_checkpointing, act=cfg.act)
        self.ln_final = nn.LayerNorm(cfg.text_width)
        self.text_projection = nn.Linear(cfg.text_width, cfg.embed_dim)

    def forward(self, tokens, return_words: bool = False):
        n = tokens.shape[1]
        if n > self.positional_embedding.shape[0]:
            raise ValueError(f"token sequences of length {n} exceed the model's context length "
                             f"{self.positional_embedding.shape[0]}")
        x = self.token_embedding(tokens) + self.positional_embedding[:n]
        words = self.ln_final(self.transformer(x))
        pooled = words[torch.arange(tokens.shape[0], device=tokens.device), tokens.argmax(dim=-1)]
        emb = self.text_projection(pooled)
        return (emb, words) if return_words else emb


# ----------------------------------------------------------------------------------------------
# DeCLIP heads and memory bank


class Projector(nn.Module):
    """SimSiam projector: 3 x (Linear, BN1d), ReLU between (spec §1.5)."""

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.linear1, self.bn1 = nn.Linear(in_dim, dim), nn.BatchNorm1d(dim)
        self.linear2, self.bn2 = nn.Linear(dim, dim), nn.BatchNorm1d(dim)
        self.linear3, self.bn3 = nn.Linear(dim, dim), nn.BatchNorm1d(dim)

    def forward(self, x):
        x = F.relu(self.bn1(self.linear1(x)))
        x = F.relu(self.bn2(self.linear2(x)))
        return self.bn3(self.linear3(x))


class Predictor(nn.Module):
    """SimSiam predictor: Linear, BN1d, ReLU, Linear (the second one really is named `layer2`)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.linear1, self.bn1 = nn.Linear(dim, hidden), nn.BatchNorm1d(hidden)
        self.layer2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.layer2(F.relu(self.bn1(self.linear1(x))))


class NNMemoryBank(nn.Module):
    """FIFO ring of L2-normalised text embeddings for nearest-neighbour supervision (spec §1.6).

    Its buffers are non-persistent (kept out of model files: 256 MB for rn50) but are part of the
    training state: `train_declip.py` checkpoints `state_dict(keep_vars)` through `bank_state()`.
    Under data parallelism every process enqueues the gathered embeddings of all processes, so all
    processes hold the same bank and it sees every caption (unlike the original's per-GPU banks).
    """

    def __init__(self, size: int, dim: int, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("bank", F.normalize(torch.randn(size, dim, generator=g), dim=1), persistent=False)
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long), persistent=False)

    @torch.no_grad()
    def query(self, q: torch.Tensor) -> torch.Tensor:
        """Top-1 cosine neighbour of each row of q among the stored embeddings."""
        sim = F.normalize(q.float(), dim=1) @ self.bank.t()
        return self.bank[sim.argmax(dim=1)]

    @torch.no_grad()
    def enqueue(self, x: torch.Tensor):
        x = F.normalize(x.detach().float(), dim=1)
        size = self.bank.shape[0]
        if x.shape[0] >= size:
            x = x[-size:]
        idx = (self.ptr + torch.arange(x.shape[0], device=x.device)) % size
        self.bank[idx] = x
        self.ptr.copy_((self.ptr + x.shape[0]) % size)

    def bank_state(self) -> dict:
        return {"bank": self.bank.detach().cpu().clone(), "ptr": self.ptr.detach().cpu().clone()}

    def load_bank_state(self, state: dict):
        self.bank.copy_(state["bank"].to(self.bank.device))
        self.ptr.copy_(state["ptr"].to(self.ptr.device))


# ----------------------------------------------------------------------------------------------
# Distributed contrastive helpers


def _dist_world() -> Tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums the incoming gradient over processes and returns this rank's
    slice, so every process's loss reaches every local feature (open_clip's loss.py does the same)."""

    @staticmethod
    def forward(ctx, x):
        rank, world = _dist_world()
        ctx.rank, ctx.n = rank, x.shape[0]
        out = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(out, x.contiguous())
        return torch.cat(out, dim=0)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.n:(ctx.rank + 1) * ctx.n]


def gather_features(x: torch.Tensor, with_grad: bool = True) -> torch.Tensor:
    """Concatenate a tensor over all processes (identity on one process)."""
    _, world = _dist_world()
    if world == 1:
        return x
    if with_grad and x.requires_grad:
        return _GatherWithGrad.apply(x)
    out = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out, dim=0)


def _all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    if _dist_world()[1] > 1:
        x = x.clone()
        dist.all_reduce(x)
    return x


def clamp_scale(logit_scale: torch.Tensor, max_scale: float = 100.0) -> torch.Tensor:
    """exp(logit_scale) capped at max_scale in the forward pass only: the original overwrote the
    exp output's `.data`, so gradients pass as if unclamped (spec §1.4, straight-through)."""
    s = logit_scale.exp()
    return s - (s - s.clamp(max=max_scale)).detach()


def info_nce(x: torch.Tensor, y: torch.Tensor, scale: torch.Tensor, ids: Optional[torch.Tensor] = None,
             symmetric: bool = True) -> torch.Tensor:
    """Symmetric InfoNCE of local rows against all processes' columns (spec §2.4, L_sym).

    x, y: local normalised features (B, D); the positives of row j are column rank*B + j.
    ids: optional per-row sample ids; other columns with the same id as a row are false negatives
    (e.g. an image and its adversarial copy captioned alike) and are masked out of that row.
    symmetric=False gives only the x->y direction (used by NN supervision, whose columns are
    detached neighbours).
    """
    rank, _ = _dist_world()
    b = x.shape[0]
    labels = torch.arange(b, device=x.device) + rank * b
    y_all = gather_features(y)
    logits_xy = scale * x @ y_all.t()
    mask = None
    if ids is not None:
        ids_all = gather_features(ids, with_grad=False)
        mask = ids[:, None] == ids_all[None, :]
        mask[torch.arange(b, device=x.device), labels] = False
        logits_xy = logits_xy.masked_fill(mask, float("-inf"))
    loss = F.cross_entropy(logits_xy, labels)
    if not symmetric:
        return loss
    x_all = gather_features(x)
    logits_yx = scale * y @ x_all.t()
    if mask is not None:
        logits_yx = logits_yx.masked_fill(mask, float("-inf"))
    return 0.5 * (loss + F.cross_entropy(logits_yx, labels))


@dataclass
class LossWeights:
    """Weights of the objective's terms. DeCLIP defaults: spec §2.5. CLIP mode = clip only.
    `inmodal` weighs CleanCLIP's unimodal term (objective "cleanclip" of DeCLIP.forward)."""

    clip: float = 0.4
    ss: float = 0.2
    mlm: float = 0.2
    nn: float = 0.2
    inmodal: float = 0.0

    @classmethod
    def clip_only(cls) -> "LossWeights":
        return cls(clip=1.0, ss=0.0, mlm=0.0, nn=0.0)


# ----------------------------------------------------------------------------------------------
# The model


class DeCLIP(nn.Module):
    def __init__(self, cfg: DeCLIPConfig):
        super().__init__()
        self.config = cfg
        if cfg.vision == "resnet":
            self.visual = ModifiedResNet(cfg.vision_layers, cfg.embed_dim, cfg.vision_heads, cfg.image_size,
                                         cfg.vision_width)
        else:
            self.visual = VisionTransformer(cfg.image_size, cfg.patch_size, cfg.vision_width, cfg.vision_layers[0],
                                            cfg.vision_heads, cfg.embed_dim, cfg.grad_checkpointing, cfg.act)
        self.text = TextTransformer(cfg)
        self.logit_scale = nn.Parameter(torch.full((1,), math.log(1 / 0.07)))
        self.projector = Projector(cfg.embed_dim, cfg.proj_dim_)
        self.predictor = Predictor(cfg.proj_dim_, cfg.pred_dim_)
        self.text_label_predictor = nn.Linear(cfg.text_width, cfg.vocab_size)
        self.nn_bank = NNMemoryBank(cfg.nn_size, cfg.embed_dim)
        # every process already holds the same bank: keep DDP from broadcasting it each step
        self._ddp_params_and_buffers_to_ignore = ["nn_bank.bank", "nn_bank.ptr"]
        self.reset_parameters()

    # -- initialisation (spec §1.7)
    def reset_parameters(self):
        cfg = self.config
        for m in self.modules():
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if isinstance(self.visual, ModifiedResNet):
            pool = self.visual.attnpool
            std = pool.q_proj.in_features ** -0.5
            for lin in (pool.q_proj, pool.k_proj, pool.v_proj, pool.c_proj):
                nn.init.normal_(lin.weight, std=std)
            for stage in (self.visual.layer1, self.visual.layer2, self.visual.layer3, self.visual.layer4):
                for block in stage:
                    nn.init.zeros_(block.bn3.weight)  # zero-init residual
        else:
            self._init_transformer(self.visual.transformer, cfg.vision_width, cfg.vision_layers[0])
        t = self.text
        nn.init.normal_(t.token_embedding.weight, std=0.02)
        nn.init.normal_(t.positional_embedding, std=0.01)
        self._init_transformer(t.transformer, cfg.text_width, cfg.text_layers)
        nn.init.normal_(t.text_projection.weight, std=cfg.text_width ** -0.5)
        with torch.no_grad():
            self.logit_scale.fill_(math.log(1 / 0.07))

    @staticmethod
    def _init_transformer(tr: Transformer, width: int, layers: int):
        attn_std, proj_std, fc_std = width ** -0.5, width ** -0.5 * (2 * layers) ** -0.5, (2 * width) ** -0.5
        for block in tr.resblocks:
            nn.init.normal_(block.attn.in_proj_weight, std=attn_std)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.normal_(block.mlp.c_fc.weight, std=fc_std)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)

    def set_grad_checkpointing(self, on: bool = True):
        """Recompute the Transformer blocks of both towers in backward (memory for time); in the config too."""
        self.config.grad_checkpointing = on
        for t in (self.text.transformer, getattr(self.visual, "transformer", None)):
            if t is not None:
                t.grad_checkpointing = on

    # -- public encoders (unnormalised embeddings)
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return self.visual(images)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.text(tokens)

    # -- feature taps for distillation defenses
    @contextlib.contextmanager
    def tap(self, names: Iterable[str]):
        """Record the outputs of the named submodules (e.g. 'visual.layer1' or
        'visual.transformer.resblocks.3') during forwards run inside the block, with gradients.
        Yields a dict name -> list of tensors, one per forward call, in call order. Nothing is
        stored on the module, so nothing reaches the state dict (spec §8 item 10)."""
        modules = dict(self.named_modules())
        store: Dict[str, List[torch.Tensor]] = {}
        handles = []
        try:
            for name in names:
                if name not in modules:
                    raise KeyError(f"no submodule named {name!r} to tap")
                store[name] = []
                handles.append(modules[name].register_forward_hook(
                    lambda _m, _i, out, _n=name: store[_n].append(out)))
            yield store
        finally:
            for h in handles:
                h.remove()

    def default_tap_names(self) -> List[str]:
        """The residual stages of a ResNet, or every block of a ViT."""
        if self.config.vision == "resnet":
            return [f"visual.layer{i}" for i in range(1, 5)]
        return [f"visual.transformer.resblocks.{i}" for i in range(self.config.vision_layers[0])]

    def clamp_logit_scale_(self, low: float = 3.0, high: float = 6.0):
        """The original's "logit_scale_param_value" clamp of the raw parameter (spec §2.6)."""
        with torch.no_grad():
            self.logit_scale.clamp_(low, high)

    # -- the objective
    def forward(self, images: torch.Tensor, tokens: torch.Tensor, images2: Optional[torch.Tensor] = None,
                tokens_aug: Optional[torch.Tensor] = None, mlm_labels: Optional[torch.Tensor] = None,
                weights: Optional[LossWeights] = None, ids: Optional[torch.Tensor] = None,
                update_bank: bool = True, mlm_index: Optional[torch.Tensor] = None,
                objective: str = "declip") -> Dict[str, torch.Tensor]:
        """The DeCLIP loss of spec §2 for one local batch; returns {'loss', and each term}.

        images/images2: two augmented views (images2 None = one view); tokens: the contrastive caption
        view (MLM-masked in DeCLIP, spec §8 item 7); tokens_aug: the EDA view (None = one text view);
        mlm_labels: targets at masked positions (-100 elsewhere); ids: optional sample ids whose
        duplicates are masked as false negatives; mlm_index: the flat positions where mlm_labels is not
        -100, from a caller that found them on the host (finding them here from GPU labels makes the
        host wait for the GPU). Under data parallelism every term equals the one computed on the
        concatenated global batch (BatchNorm statistics aside).
        objective "cleanclip": CleanCLIP's loss instead (see `cleanclip_loss`); images2 and tokens_aug
        are then the augmented copies of images and tokens.
        """
        w = weights or LossWeights()
        if objective == "cleanclip":
            return self.cleanclip_loss(images, images2, tokens, tokens_aug, w, ids)
        views = [images] if images2 is None else [images, images2]
        feats = [self.encode_image(v) for v in views]
        need_words = mlm_labels is not None and w.mlm > 0
        t, words = self.text(tokens, return_words=True) if need_words else (self.text(tokens), None)
        texts = [t] if tokens_aug is None else [t, self.text(tokens_aug)]

        f_hat = [f / f.norm(dim=1, keepdim=True) for f in feats]
        t_hat = [x / (x.norm(dim=1, keepdim=True) + 1e-10) for x in texts]
        scale = clamp_scale(self.logit_scale).squeeze()
        out: Dict[str, torch.Tensor] = {}
        pairs = [(fi, ti) for fi in f_hat for ti in t_hat]
        out["clip"] = sum(info_nce(fi, ti, scale, ids) for fi, ti in pairs) / len(pairs)
        loss = w.clip * out["clip"]

        if w.ss > 0 and len(feats) == 2:
            z = [self.projector(f) for f in feats]
            p = [self.predictor(zi) for zi in z]
            d = lambda a, b: F.cosine_similarity(a, b.detach(), dim=1).mean()
            out["ss"] = -0.5 * (d(p[0], z[1]) + d(p[1], z[0]))
            loss = loss + w.ss * out["ss"]

        if need_words:
            if mlm_index is None:
                mlm_index = (mlm_labels.flatten() != -100).nonzero()[:, 0]
            logits = self.text_label_predictor(words.flatten(0, 1)[mlm_index])
            ce_sum = F.cross_entropy(logits.float(), mlm_labels.flatten()[mlm_index], reduction="sum")
            # mean over the masked tokens of the global batch (times world size, since data
            # parallelism averages the processes' losses); zero, not NaN, when none is masked
            _, world = _dist_world()
            count = _all_reduce_sum(torch.full((), float(mlm_index.numel()), device=logits.device))
            out["mlm"] = ce_sum * world / count.clamp(min=1)
            loss = loss + w.mlm * out["mlm"]

        if w.nn > 0:
            with torch.no_grad():
                nn_t = [self.nn_bank.query(x).to(x.dtype) for x in t_hat]  # queried before enqueue
                nn_t = [gather_features(x / (x.norm(dim=1, keepdim=True) + 1e-10)) for x in nn_t]
            terms = []
            for fi in f_hat:
                ce = [F.cross_entropy(scale * fi @ n.t(), torch.arange(fi.shape[0], device=fi.device)
                                      + _dist_world()[0] * fi.shape[0]) for n in nn_t]
                terms.append(sum(ce) / len(ce))
            out["nn"] = sum(terms) / len(terms)
            loss = loss + w.nn * out["nn"]
            if update_bank and self.training:
                for x in reversed(t_hat):  # EDA view first, then the MLM view (spec §1.6)
                    self.nn_bank.enqueue(gather_features(x.detach(), with_grad=False))

        out["loss"] = loss
        out["logit_scale"] = scale.detach()
        return out

    def cleanclip_loss(self, images, images_aug, tokens, tokens_aug, w: LossWeights,
                       ids: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        """CleanCLIP (Bansal et al., ICCV 2023; official src/train.py get_loss): w.clip * L_cross +
        w.inmodal * (L_img + L_txt) / 2. L_cross: symmetric InfoNCE of the original images and captions,
        halved; L_img and L_txt: one-way InfoNCE whose rows are the originals and whose columns are
        their augmented copies. The augmented copies never enter L_cross."""
        f = self.encode_image(torch.cat([images, images_aug]))  # one pass: BatchNorm sees both, as in CleanCLIP
        t = self.text(torch.cat([tokens, tokens_aug]))
        f = f / f.norm(dim=1, keepdim=True)
        t = t / (t.norm(dim=1, keepdim=True) + 1e-10)
        (f, f_aug), (t, t_aug) = f.chunk(2), t.chunk(2)
        scale = clamp_scale(self.logit_scale).squeeze()
        out = {"clip": info_nce(f, t, scale, ids),
               "img_inmodal": info_nce(f, f_aug, scale, symmetric=False),
               "txt_inmodal": info_nce(t, t_aug, scale, symmetric=False)}
        out["inmodal"] = 0.5 * (out["img_inmodal"] + out["txt_inmodal"])
        out["loss"] = w.clip * out["clip"] + w.inmodal * out["inmodal"]
        out["logit_scale"] = scale.detach()
        return out


def build_model(preset_or_config: Union[str, dict, DeCLIPConfig] = "tiny", **overrides) -> DeCLIP:
    """A freshly initialised model from a preset name ('tiny', 'tiny-vit', 'rn50', 'rn101', 'vitb32'),
    a config dict or a DeCLIPConfig."""
    return DeCLIP(get_config(preset_or_config, **overrides))


# ----------------------------------------------------------------------------------------------
# Optimizer groups and FLOPs


def param_groups(model: nn.Module, weight_decay: float) -> List[dict]:
    """Decay tensors of rank >= 2 (weights, embeddings); no decay for biases, norms, logit scale."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def count_parameters(model: DeCLIP) -> Dict[str, int]:
    n = lambda m: sum(p.numel() for p in m.parameters())
    heads = n(model.projector) + n(model.predictor) + n(model.text_label_predictor)
    return {"visual": n(model.visual), "text": n(model.text), "heads": heads,
            "logit_scale": model.logit_scale.numel(), "total": n(model)}


def estimate_flops(cfg: DeCLIPConfig, mode: str = "declip", training: bool = True,
                   text_len: Optional[int] = None) -> Dict[str, float]:
    """Model FLOPs for one image-text pair (matmuls and convolutions, counted by running batch-1
    forwards of the towers on the meta device), times 3 for forward+backward when training.
    DeCLIP mode runs two image views and two text views plus the SimSiam heads on both views and
    the MLM head on the ~15% masked tokens. text_len: tokens per caption (default: context length).
    Returns {'image', 'text', 'heads', 'total'}."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        model = DeCLIP(dataclasses.replace(cfg, nn_size=1)).eval()
    n = text_len or cfg.context_length

    def count(fn):
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            fn()
        return float(counter.get_total_flops())

    image = count(lambda: model.encode_image(torch.empty(1, 3, cfg.image_size, cfg.image_size, device="meta")))
    text = count(lambda: model.text(torch.zeros(1, n, dtype=torch.long, device="meta")))
    views, heads = 1, 0.0
    if mode == "declip":
        p, q = cfg.proj_dim_, cfg.pred_dim_
        views = 2
        heads = 2 * 2 * (cfg.embed_dim * p + 2 * p * p + 2 * p * q) + 2 * cfg.text_width * cfg.vocab_size * 0.15 * n
    mult = 3 if training else 1
    parts = {"image": views * image * mult, "text": views * text * mult, "heads": heads * mult}
    parts["total"] = sum(parts.values())
    return parts


# ----------------------------------------------------------------------------------------------
# Checkpoint I/O


def save_model(model: DeCLIP, path: str, metadata: Optional[dict] = None,
               state_dict: Optional[Dict[str, torch.Tensor]] = None):
    """One self-describing .safetensors file: the weights, the model config and provenance as JSON
    metadata. Written atomically (temporary file, then rename). state_dict: the full weights when
    the model's own are sharded (FSDP: accelerator.get_state_dict(model))."""
    from safetensors.torch import save_file

    model = getattr(model, "module", model)
    sd = state_dict if state_dict is not None else model.state_dict()
    tensors = {k: v.detach().cpu().contiguous() for k, v in sd.items()}
    meta = {"format": FORMAT_TAG, "config": json.dumps(model.config.to_dict()),
            "metadata": json.dumps(metadata or {})}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


def read_metadata(path: str) -> dict:
    """Provenance metadata stored by save_model ({} for foreign files)."""
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        meta = f.metadata() or {}
    return json.loads(meta.get("metadata", "{}"))


def _is_torchscript(path: str) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(n.endswith("constants.pkl") or "/code/" in n for n in z.namelist())


def _torch_version() -> Tuple[int, int]:
    m = re.match(r"(\d+)\.(\d+)", str(torch.__version__))
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def _pickle_globals(path: str) -> Optional[List[str]]:
    """The `module.name` globals the pickles of a torch file import, read with pickletools (which
    decodes opcodes and runs nothing); None when the file is neither a torch zip archive nor a pickle."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            pkl = [n for n in z.namelist() if n.endswith("data.pkl")]
            if not pkl:
                return None
            data = z.read(pkl[0])
    else:
        with open(path, "rb") as f:
            data = f.read()
    stream, names, pickles = io.BytesIO(data), [], 0
    while pickles < 5 and stream.tell() < len(data):  # the legacy format is several pickles in a row
        strings = []
        try:
            ops = list(pickletools.genops(stream))
        except Exception:
            break
        if pickles == 0 and ops[0][0].name != "PROTO":
            return None  # every pickle torch or pickle.dump writes starts with PROTO
        for op, arg, _ in ops:
            if op.name == "GLOBAL":
                names.append(arg.replace(" ", "."))
            elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                names.append(".".join(strings[-2:]))
            if isinstance(arg, str):
                strings.append(arg)
        pickles += 1
    return names if pickles else None


def _safe_torch_load(path: str):
    if _torch_version() < SAFE_TORCH_LOAD:
        raise CheckpointError(
            f"refusing to unpickle {path} with torch {torch.__version__}: before "
            f"{'.'.join(map(str, SAFE_TORCH_LOAD))}, torch.load(weights_only=True) can be made to run code "
            f"(CVE-2025-32434, CVE-2026-24747); install torch>={'.'.join(map(str, SAFE_TORCH_LOAD))} "
            f"(requirements.txt) or use a .safetensors file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        names = _pickle_globals(path)
        if names is None:
            raise CheckpointError(f"{path} is not a checkpoint in any supported format (neither safetensors, "
                                  f"a TorchScript or torch archive, nor a pickle)") from None
        code = [n for n in names if not n.startswith(("torch.", "collections.OrderedDict"))]
        if code:
            raise CheckpointError(
                f"refusing to load {path}: it is a pickle that needs arbitrary code to unpickle (it imports "
                f"{', '.join(sorted(set(code))[:3])}), which could run anything on this machine") from None
        raise CheckpointError(f"{path} is not a checkpoint this toolkit can read ({reason})") from None


def _strip(sd: dict, prefix: str) -> dict:
    if sd and all(k.startswith(prefix) for k in sd):
        return {k[len(prefix):]: v for k, v in sd.items()}
    return sd


def _count_indexed(sd: dict, prefix: str) -> int:
    idx = {int(k[len(prefix):].split(".")[0]) for k in sd if k.startswith(prefix)}
    return max(idx) + 1 if idx else 0


def infer_config(sd: dict, text_prefix: str = "", mean=CLIP_MEAN, std=CLIP_STD) -> DeCLIPConfig:
    """Architecture of an OpenAI/open_clip-layout (or our layout, text_prefix='text.') state dict."""
    tp = text_prefix
    tok = sd[tp + "token_embedding.weight"]
    text_width = tok.shape[1]
    proj = sd.get(tp + "text_projection.weight")
    embed_dim = proj.shape[0] if proj is not None else sd[tp + "text_projection"].shape[1]
    kw = dict(context_length=sd[tp + "positional_embedding"].shape[0], vocab_size=VOCAB_SIZE,
              text_width=text_width, text_heads=max(text_width // 64, 1),
              text_layers=_count_indexed(sd, tp + "transformer.resblocks."), embed_dim=embed_dim,
              image_mean=mean, image_std=std)
    if "visual.layer1.0.conv1.weight" in sd:
        width = sd["visual.layer1.0.conv1.weight"].shape[0]
        layers = tuple(_count_indexed(sd, f"visual.layer{i}.") for i in range(1, 5))
        grid = int(round(math.sqrt(sd["visual.attnpool.positional_embedding"].shape[0] - 1)))
        kw.update(vision="resnet", vision_layers=layers, vision_width=width, vision_heads=width * 32 // 64,
                  image_size=grid * 32)
    elif "visual.conv1.weight" in sd and "visual.class_embedding" in sd:
        width, _, patch, _ = sd["visual.conv1.weight"].shape
        grid = int(round(math.sqrt(sd["visual.positional_embedding"].shape[0] - 1)))
        kw.update(vision="vit", vision_layers=(_count_indexed(sd, "visual.transformer.resblocks."),),
                  vision_width=width, vision_heads=width // 64, patch_size=patch, image_size=grid * patch)
    else:
        raise CheckpointError("the state dict has neither a ModifiedResNet nor a ViT image tower")
    return DeCLIPConfig(**kw)


def convert_openai_state_dict(sd: dict) -> Tuple[DeCLIPConfig, dict]:
    """OpenAI/open_clip CLIP layout -> ours (spec §3.5): text modules under `text.`, projection
    transposed into a Linear with zero bias (open_clip's `proj_bias` Linear is taken as it is), token
    rows remapped to DeCLIP's special ids, logit scale reshaped to [1]. The <|mask|> row and the
    DeCLIP heads are left to fresh init."""
    sd = {k: v for k, v in sd.items() if k not in ("input_resolution", "context_length", "vocab_size")
          and not k.endswith("attn_mask")}
    cfg = infer_config(sd)
    out = {}
    for k, v in sd.items():
        if k.startswith("visual."):
            out[k] = v
        elif k == "text_projection":
            out["text.text_projection.weight"] = v.t().contiguous()
            out["text.text_projection.bias"] = torch.zeros(v.shape[1], dtype=v.dtype)
        elif k in ("text_projection.weight", "text_projection.bias"):
            out["text." + k] = v
        elif k == "token_embedding.weight":
            new = torch.empty(VOCAB_SIZE, v.shape[1], dtype=v.dtype)
            nn.init.normal_(new, std=0.02)
            new[:OPENAI_SOT_ID] = v[:OPENAI_SOT_ID]
            new[SOT_ID], new[EOT_ID] = v[OPENAI_SOT_ID], v[OPENAI_EOT_ID]
            out["text.token_embedding.weight"] = new
        elif k == "logit_scale":
            out[k] = v.reshape(1)
        elif k.startswith(("transformer.", "positional_embedding", "ln_final.")):
            out["text." + k] = v
    if "text.text_projection.weight" in out and "text.text_projection.bias" not in out:
        out["text.text_projection.bias"] = torch.zeros(cfg.embed_dim, dtype=out["text.text_projection.weight"].dtype)
    return cfg, out


def _declip_key(k: str) -> Optional[str]:
    """Our name of an official DeCLIP state-dict key (`module.` stripped), or None for what we drop:
    recorded activations (`*_feat_*`, spec §3.4) and the dead `visual.fc` head (spec §8 item 14)."""
    if "_feat_" in k or k.startswith("visual.fc.") or k.startswith("nn_replacer"):
        return None
    return "text." + k[len("encode_text."):] if k.startswith("encode_text.") else k


def convert_declip_state_dict(sd: dict) -> Tuple[DeCLIPConfig, dict]:
    """Official DeCLIP / BD_DeCLIP `model` dict -> ours: strip `module.`, `encode_text.` -> `text.`,
    drop what `_declip_key` drops."""
    sd = _strip(sd, "module.")
    out = {}
    for k, v in sd.items():
        if _declip_key(k) is not None:
            out[_declip_key(k)] = v
    cfg = infer_config(out, text_prefix="text.", mean=IMAGENET_MEAN, std=IMAGENET_STD)
    return cfg, out


# transformers CLIPModel <-> OpenAI layout. Per-block names, then whole-model names; the q/k/v
# projections are packed into in_proj and the two projections are transposed.
_HF_BLOCK = {"self_attn.out_proj": "attn.out_proj", "layer_norm1": "ln_1", "layer_norm2": "ln_2",
             "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
_HF_TOP = {"text_model.embeddings.token_embedding.weight": "token_embedding.weight",
           "text_model.embeddings.position_embedding.weight": "positional_embedding",
           "text_model.final_layer_norm.weight": "ln_final.weight",
           "text_model.final_layer_norm.bias": "ln_final.bias",
           "vision_model.embeddings.class_embedding": "visual.class_embedding",
           "vision_model.embeddings.patch_embedding.weight": "visual.conv1.weight",
           "vision_model.embeddings.position_embedding.weight": "visual.positional_embedding",
           "vision_model.pre_layrnorm.weight": "visual.ln_pre.weight",
           "vision_model.pre_layrnorm.bias": "visual.ln_pre.bias",
           "vision_model.post_layernorm.weight": "visual.ln_post.weight",
           "vision_model.post_layernorm.bias": "visual.ln_post.bias",
           "logit_scale": "logit_scale"}
_HF_TRANSPOSED = {"text_projection.weight": "text_projection", "visual_projection.weight": "visual.proj"}
_HF_TOWERS = (("text_model.encoder.layers.", "transformer.resblocks."),
              ("vision_model.encoder.layers.", "visual.transformer.resblocks."))


def _hf_block_keys(sd: dict, source: int):
    """(transformers key, OpenAI-layout key) of every per-block weight but q/k/v, for the blocks that
    sd holds; source: which side sd is in (0 transformers, 1 OpenAI)."""
    for towers in _HF_TOWERS:
        for i in range(_count_indexed(sd, towers[source])):
            p, q = f"{towers[0]}{i}.", f"{towers[1]}{i}."
            for name, ours in _HF_BLOCK.items():
                for t in ("weight", "bias"):
                    yield f"{p}{name}.{t}", f"{q}{ours}.{t}"
            for t in ("weight", "bias"):
                yield [f"{p}self_attn.{x}_proj.{t}" for x in "qkv"], f"{q}attn.in_proj_{t}"


def _hf_to_openai_layout(sd: dict) -> dict:
    out = {}
    for k, v in sd.items():
        if k in _HF_TOP:
            out[_HF_TOP[k]] = v
        elif k in _HF_TRANSPOSED:
            out[_HF_TRANSPOSED[k]] = v.t().contiguous()
    for hf, oa in _hf_block_keys(sd, 0):  # a list of three keys: q, k, v stacked into in_proj
        out[oa] = torch.cat([sd[k] for k in hf]) if isinstance(hf, list) else sd[hf]
    return out


def _openai_layout_to_hf(sd: dict) -> dict:
    out = {hf: sd[oa] for hf, oa in _HF_TOP.items()}
    out["logit_scale"] = out["logit_scale"].reshape(())
    out.update({hf: sd[oa].t().contiguous() for hf, oa in _HF_TRANSPOSED.items()})
    for hf, oa in _hf_block_keys(sd, 1):
        if isinstance(hf, list):
            out.update({k: part.contiguous() for k, part in zip(hf, sd[oa].chunk(3))})
        else:
            out[hf] = sd[oa]
    return out


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path} is not readable JSON ({e})") from None


def _preprocess_stats(mean_key: str, std_key: str, obj: Optional[dict]) -> dict:
    """image_mean/image_std overrides from a processor config (CLIP's statistics when absent)."""
    obj = obj or {}
    if mean_key in obj and std_key in obj:
        return dict(image_mean=tuple(obj[mean_key]), image_std=tuple(obj[std_key]))
    return dict(image_mean=CLIP_MEAN, image_std=CLIP_STD)


def convert_transformers_state_dict(sd: dict, d: str) -> Tuple[DeCLIPConfig, dict]:
    """A transformers CLIPModel (ViT image tower) whose config.json (read with transformers, offline)
    lies in directory d -> ours, through the OpenAI layout (the same token-row convention)."""
    try:
        from transformers import CLIPConfig
    except ImportError:
        raise CheckpointError(f"{d} is a transformers CLIP checkpoint: install transformers "
                              f"(requirements.txt) to read it") from None
    if not os.path.isfile(os.path.join(d, "config.json")):
        raise CheckpointError(f"{d}: transformers CLIP weights need the config.json saved beside them")
    try:
        hf = CLIPConfig.from_pretrained(d, local_files_only=True)
    except Exception as e:
        raise CheckpointError(f"{d}/config.json is not a transformers CLIP config ({str(e)[:160]})") from None
    t, v = hf.text_config, hf.vision_config
    problems = []
    if t.hidden_act != v.hidden_act or t.hidden_act not in ACTIVATIONS:
        problems.append(f"hidden_act {t.hidden_act!r}/{v.hidden_act!r} (supported: the same one of "
                        f"{', '.join(ACTIVATIONS)} in both towers)")
    for name, c in (("text", t), ("vision", v)):
        if c.intermediate_size != 4 * c.hidden_size or abs(c.layer_norm_eps - 1e-5) > 1e-12:
            problems.append(f"{name} MLP ratio {c.intermediate_size / c.hidden_size:g} / layer_norm_eps "
                            f"{c.layer_norm_eps} (supported: 4 and 1e-5)")
    if t.vocab_size != OPENAI_EOT_ID + 1 or t.eos_token_id not in (2, OPENAI_EOT_ID):
        problems.append(f"vocabulary {t.vocab_size} / eos_token_id {t.eos_token_id} (supported: OpenAI's "
                        f"{OPENAI_EOT_ID + 1} tokens, end token {OPENAI_EOT_ID})")
    if problems:
        raise CheckpointError(f"{d}: this CLIP variant is not supported: {'; '.join(problems)}")
    cfg, out = convert_openai_state_dict(_hf_to_openai_layout(sd))
    pre = os.path.join(d, "preprocessor_config.json")
    stats = _preprocess_stats("image_mean", "image_std", _read_json(pre) if os.path.isfile(pre) else None)
    cfg = dataclasses.replace(cfg, act=t.hidden_act, text_heads=t.num_attention_heads,
                              vision_heads=v.num_attention_heads, **stats)
    return cfg, out


def _open_clip_config(d: str) -> Optional[Tuple[str, dict]]:
    """(activation, config overrides) from the open_clip_config.json beside open_clip weights (the
    layout of HF-hub open_clip models and of export_open_clip); None when there is none."""
    path = os.path.join(d, "open_clip_config.json")
    if not os.path.isfile(path):
        return None
    obj = _read_json(path)
    mc = obj.get("model_cfg", obj)
    vc, tc = mc.get("vision_cfg", {}), mc.get("text_cfg", {})
    unsupported = [k for k, ok in (("timm_model_name", not vc.get("timm_model_name")),
                                   ("hf_model_name", not tc.get("hf_model_name")),
                                   ("text pool_type", tc.get("pool_type", "argmax") == "argmax"),
                                   ("no_causal_mask", not tc.get("no_causal_mask")),
                                   ("final_ln_after_pool", not tc.get("final_ln_after_pool")),
                                   ("attentional_pool", not vc.get("attentional_pool")),
                                   ("mlp_ratio", vc.get("mlp_ratio", 4.0) == 4.0 and tc.get("mlp_ratio", 4.0) == 4.0))
                   if not ok]
    if unsupported:
        raise CheckpointError(f"{path}: open_clip options this toolkit does not implement: {', '.join(unsupported)}")
    head_width = vc.get("head_width", 64)
    over = dict(text_heads=tc.get("heads", 8),
                **_preprocess_stats("mean", "std", obj.get("preprocess_cfg")))
    if isinstance(vc.get("layers"), (list, tuple)):
        over["vision_heads"] = vc.get("width", 64) * 32 // head_width
    else:
        over["vision_heads"] = vc.get("width", 768) // head_width
    return ("quick_gelu" if mc.get("quick_gelu") else "gelu"), over


# What load_model reads in a directory, in this order: our run directories and transformers'
# save_pretrained (model.safetensors), open_clip's HF-hub layout, transformers' pickle weights.
DIR_WEIGHTS = ("model.safetensors", "open_clip_model.safetensors", "open_clip_pytorch_model.bin", "pytorch_model.bin")


def checkpoint_file(path: str) -> Optional[str]:
    """The file load_model reads for path (a directory: the first of DIR_WEIGHTS in it); None when a
    directory holds none of them."""
    if not os.path.isdir(path):
        return path
    return next((os.path.join(path, n) for n in DIR_WEIGHTS if os.path.isfile(os.path.join(path, n))), None)


def _read_foreign(path: str) -> Tuple[str, dict]:
    """(format name, raw state dict) of a checkpoint that is not ours."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return "open_clip", load_file(path)
    if _is_torchscript(path):
        # TorchScript archives (OpenAI's released .pt) hold TorchScript code, not pickled Python
        # objects; torch.jit.load runs no arbitrary Python.
        return "openai", torch.jit.load(path, map_location="cpu").state_dict()
    obj = _safe_torch_load(path)
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a state dict")
    if isinstance(obj.get("model"), dict):
        return "declip", obj["model"]
    if isinstance(obj.get("state_dict"), dict):
        return "open_clip", obj["state_dict"]
    return "open_clip", obj


_BN_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


def declip_param_groups(sd: dict) -> List[List[str]]:
    """The parameter names of each AdamW group of the official DeCLIP solver, in its order, rebuilt from
    the key order of its `model` state dict (module registration order). prototype/utils/misc.py
    param_group_all with the DeCLIP configs' pconfig keys bn_w, ln_w, logit_scale, bias (spec §4.4):
    groups [normal, bn_w, bn_b, conv_b, linear_b, ln_w, ln_b, logit_scale, bias]; a module walk puts
    every conv/linear/BN/LayerNorm bias in `bias` and BN/LN weights in bn_w/ln_w; `logit_scale` and
    everything else (conv/linear weights, embeddings, packed attention projections) in named-parameter
    order. Module types come from the keys: BN has running statistics, conv weights are 4-d, LayerNorm
    has 1-d weight and bias, an Embedding is `token_embedding`."""
    params = [k for k in sd if k.rsplit(".", 1)[-1] not in _BN_BUFFERS and "_feat_" not in k]
    modules: Dict[str, List[str]] = {}
    for k in params:
        prefix, leaf = k.rsplit(".", 1) if "." in k else ("", k)
        modules.setdefault(prefix, []).append(leaf)
    groups = {g: [] for g in ("bn_w", "bn_b", "conv_b", "linear_b", "ln_w", "ln_b", "logit_scale", "bias")}
    for prefix, leaves in modules.items():
        if "weight" not in leaves or prefix.endswith("token_embedding"):
            continue  # raw Parameters (embeddings, packed attention projections), Embedding: normal
        weight = sd[f"{prefix}.weight"]
        if f"{prefix}.running_mean" in sd:
            kind = "bn"
        elif weight.ndim in (2, 4):
            kind = "conv_or_linear"
        elif weight.ndim == 1 and "bias" in leaves:
            kind = "ln"
        else:
            continue
        if "bias" in leaves:
            groups["bias"].append(f"{prefix}.bias")
        if kind in ("bn", "ln"):
            groups[f"{kind}_w"].append(f"{prefix}.weight")
    groups["logit_scale"] = [k for k in params if "logit_scale" in k]
    special = {k for g in groups.values() for k in g}
    return [[k for k in params if k not in special]] + list(groups.values())


def declip_optimizer_state(path: str) -> Dict[str, dict]:
    """Per-parameter AdamW state (exp_avg, exp_avg_sq, step) of an official DeCLIP / BD_DeCLIP .pth.tar,
    keyed by our parameter names; the group layout is checked against the file's."""
    obj = _safe_torch_load(path)
    if not (isinstance(obj, dict) and isinstance(obj.get("model"), dict) and isinstance(obj.get("optimizer"), dict)):
        raise CheckpointError(f"{path} carries no DeCLIP optimizer state (no 'model' and 'optimizer' entries)")
    sd, opt = _strip(obj["model"], "module."), obj["optimizer"]
    names = declip_param_groups(sd)
    sizes = [len(g["params"]) for g in opt["param_groups"]]
    if sizes != [len(g) for g in names]:
        raise CheckpointError(f"{path}: its optimizer groups hold {sizes} parameters, not the DeCLIP solver's "
                              f"layout {[len(g) for g in names]}; its optimizer state cannot be mapped")
    out = {}
    for group_names, group in zip(names, opt["param_groups"]):
        for name, pid in zip(group_names, group["params"]):
            ours, state = _declip_key(name), opt["state"].get(pid)
            if ours is not None and state:
                if state["exp_avg"].shape != sd[name].shape:
                    raise CheckpointError(f"{path}: the optimizer state of {name} has shape "
                                          f"{tuple(state['exp_avg'].shape)}, not its parameter's")
                out[ours] = state
    return out
_NOTED: set = set()  # paths whose activation note was printed: once per process, however often loaded


def _is_main_process() -> bool:
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))) == 0


def load_model(path: str, device: Union[str, torch.device] = "cpu", preset: Optional[str] = None,
               return_info: bool = False, activation: Optional[str] = None):
    """Load any supported checkpoint (format detected): our .safetensors, official DeCLIP .pth.tar,
    OpenAI CLIP .pt (TorchScript or state dict), open_clip state dicts (.pt/.bin/.safetensors, with
    the open_clip_config.json of HF-hub open_clip models when it lies beside them), transformers CLIP
    save_pretrained directories; a directory is read through checkpoint_file.
    Returns the model in eval mode (and, with return_info, a dict: format, missing heads, metadata,
    activation and notes). preset: if given, the checkpoint's architecture must match it.
    activation: 'quick_gelu' or 'gelu' for a bare state dict, which cannot say which one its
    Transformers use (assumed QuickGELU with a printed note when None); a checkpoint that says its
    activation must not be contradicted."""
    given = path
    path = checkpoint_file(path)
    if path is None:
        raise CheckpointError(f"{given} is a directory without a checkpoint (looked for {', '.join(DIR_WEIGHTS)})")
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path} does not exist")
    if activation is not None and activation not in ACTIVATIONS:
        raise CheckpointError(f"activation must be one of {', '.join(ACTIVATIONS)}, not {activation!r}")
    info = {"format": None, "fresh": [], "dropped": [], "metadata": {}, "notes": []}
    cfg = sd = None
    stated = None  # the activation the checkpoint itself says
    if path.endswith(".safetensors"):
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
        if meta.get("format", "").startswith("declip-bd"):
            from safetensors.torch import load_file

            cfg = DeCLIPConfig.from_dict(json.loads(meta["config"]))  # files before `act` mean quick_gelu
            sd = load_file(path)
            stated = cfg.act
            info.update(format="ours", metadata=json.loads(meta.get("metadata", "{}")))
    if sd is None:
        fmt, raw = _read_foreign(path)
        raw = _strip(raw, "module.")
        d = os.path.dirname(os.path.abspath(path))
        if any(k.startswith("encode_text.") for k in raw):
            cfg, sd = convert_declip_state_dict(raw)
            info["format"], stated = "declip", "quick_gelu"
        elif any(k.startswith(("text_model.", "vision_model.")) for k in raw):
            if not all(any(k.startswith(t) for k in raw) for t in ("text_model.", "vision_model.", "text_projection.")):
                raise CheckpointError(f"{path}: a transformers CLIP checkpoint needs both towers and their "
                                      f"projections (a CLIPModel, not a CLIPTextModel or CLIPVisionModel)")
            cfg, sd = convert_transformers_state_dict(raw, d)
            info["format"], stated = "transformers", cfg.act
        elif "text_projection" in raw or "text_projection.weight" in raw:
            cfg, sd = convert_openai_state_dict(raw)
            info["format"] = fmt
            oc = _open_clip_config(d) if fmt == "open_clip" else None
            if fmt == "openai":
                stated = "quick_gelu"  # OpenAI's released models all use QuickGELU
            elif oc is not None:
                stated, over = oc
                cfg = dataclasses.replace(cfg, **over)
        elif "text.text_projection.weight" in raw:
            cfg, sd = infer_config(raw, text_prefix="text.", mean=IMAGENET_MEAN, std=IMAGENET_STD), raw
            info["format"] = "ours-torch"
        else:
            raise CheckpointError(f"{path}: unknown checkpoint format (no CLIP/DeCLIP text tower found)")
        info["dropped"] = [k for k in raw if k.startswith("visual.fc.")]
    if stated is not None and activation is not None and activation != stated:
        raise CheckpointError(f"{path} says its activation is {stated}; the activation asked for ({activation}, "
                              f"--activation) contradicts it: leave the flag out")
    act = stated or activation
    if act is None:
        act = "quick_gelu"
        note = (f"note: {path} does not say which activation its Transformers use: assumed QuickGELU (OpenAI, "
                f"DeCLIP, open_clip '-quickgelu' models); pass --activation gelu (load_model(..., activation="
                f"'gelu')) for open_clip models without '-quickgelu' (RN50, ViT-B-32, the LAION/DataComp weights)")
        info["notes"].append(note)
        if _is_main_process() and os.path.abspath(path) not in _NOTED:
            _NOTED.add(os.path.abspath(path))
            print(note, file=sys.stderr)
    cfg = dataclasses.replace(cfg, act=act)
    info["activation"] = act
    if preset is not None:
        want = get_config(preset)
        fields = ("vision", "vision_layers", "vision_width", "embed_dim", "text_width", "text_layers")
        diff = [f for f in fields if getattr(want, f) != getattr(cfg, f)]
        if diff:
            raise CheckpointError(f"{path} does not match preset {preset!r}: it differs in {', '.join(diff)}")
    model = DeCLIP(cfg)
    own = model.state_dict()
    bad = [k for k, v in sd.items() if k in own and own[k].shape != v.shape]
    if bad:
        raise CheckpointError(f"{path}: tensor shapes do not match the inferred architecture: {', '.join(bad[:5])}")
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    heads = ("projector.", "predictor.", "text_label_predictor.")
    info["fresh"] = sorted({k.split(".")[0] for k in missing if k.startswith(heads)})
    other = [k for k in missing if not k.startswith(heads)]
    if other or unexpected:
        raise CheckpointError(f"{path}: missing {other[:5]} unexpected {list(unexpected)[:5]}")
    model.to(device).eval()
    return (model, info) if return_info else model


# ----------------------------------------------------------------------------------------------
# Export to the open_clip and transformers layouts


def to_openai_state_dict(model: DeCLIP, fold_bias: bool = True) -> Tuple[dict, bool]:
    """Our weights in the OpenAI/open_clip layout (the inverse of convert_openai_state_dict; the
    <|mask|> row and the DeCLIP heads are dropped). That layout's text projection has no bias: with
    fold_bias, ours is moved into ln_final's bias when the projection can carry it exactly (W d = b,
    which changes the other tokens' final features but not the pooled end token's embedding).
    Returns (state dict, whether the bias needs open_clip's `proj_bias` Linear instead)."""
    model = getattr(model, "module", model)
    cfg = model.config
    if cfg.vocab_size != VOCAB_SIZE:
        raise CheckpointError(f"only models with DeCLIP's {VOCAB_SIZE}-token vocabulary can be exported")
    out = {}
    for k, v in model.state_dict().items():
        v = v.detach().cpu()
        if k.startswith("visual."):
            out[k] = v
        elif k == "logit_scale":
            out[k] = v.reshape(())
        elif k == "text.token_embedding.weight":
            tok = torch.cat([v[:OPENAI_SOT_ID], v[SOT_ID:SOT_ID + 1], v[EOT_ID:EOT_ID + 1]])
            out["token_embedding.weight"] = tok.contiguous()
        elif k.startswith("text.") and not k.startswith("text.text_projection."):
            out[k[len("text."):]] = v
    w = model.text.text_projection.weight.detach().cpu()
    b = model.text.text_projection.bias.detach().cpu()
    if fold_bias:
        delta = torch.linalg.lstsq(w.double(), b.double().unsqueeze(1)).solution.squeeze(1)
        if (w.double() @ delta - b.double()).abs().max() <= 1e-6 * max(1.0, b.abs().max().item()):
            out["ln_final.bias"] = (out["ln_final.bias"].double() + delta).to(b.dtype)
            out["text_projection"] = w.t().contiguous()
            return out, False
    out["text_projection.weight"], out["text_projection.bias"] = w.clone(), b.clone()
    return out, True


def _open_clip_model_cfg(cfg: DeCLIPConfig, proj_bias: bool) -> dict:
    if cfg.vision == "resnet":
        vision = dict(image_size=cfg.image_size, layers=list(cfg.vision_layers), width=cfg.vision_width,
                      head_width=cfg.vision_width * 32 // cfg.vision_heads)
    else:
        vision = dict(image_size=cfg.image_size, layers=cfg.vision_layers[0], width=cfg.vision_width,
                      patch_size=cfg.patch_size, head_width=cfg.vision_width // cfg.vision_heads)
    text = dict(context_length=cfg.context_length, vocab_size=OPENAI_EOT_ID + 1, width=cfg.text_width,
                heads=cfg.text_heads, layers=cfg.text_layers)
    if proj_bias:
        text["proj_bias"] = True
    return dict(embed_dim=cfg.embed_dim, quick_gelu=cfg.act == "quick_gelu", vision_cfg=vision, text_cfg=text)


def export_open_clip(model: DeCLIP, out_dir: str):
    """open_clip's HF-hub layout in out_dir: open_clip_model.safetensors (an open_clip CLIP state dict)
    and open_clip_config.json (architecture, activation, image statistics), so that
    open_clip.create_model('local-dir:OUT') builds and loads it. When the text projection bias cannot
    be folded (embed_dim above the text width), the config asks for open_clip's `proj_bias` Linear."""
    from safetensors.torch import save_file

    model = getattr(model, "module", model)
    sd, proj_bias = to_openai_state_dict(model)
    cfg = model.config
    conf = {"model_cfg": _open_clip_model_cfg(cfg, proj_bias),
            "preprocess_cfg": {"mean": list(cfg.image_mean), "std": list(cfg.image_std)}}
    os.makedirs(out_dir, exist_ok=True)
    tensors = {k: v.contiguous() for k, v in sd.items()}
    atomic_write(os.path.join(out_dir, "open_clip_model.safetensors"), lambda tmp: save_file(tensors, tmp))

    def write_json(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(json.dumps(conf, indent=2) + "\n")

    atomic_write(os.path.join(out_dir, "open_clip_config.json"), write_json)


def export_transformers(model: DeCLIP, out_dir: str):
    """A transformers CLIPModel directory (config.json, model.safetensors, preprocessor_config.json)
    written with save_pretrained. transformers' CLIP has only ViT image towers and a text projection
    without bias, so ResNet models, and models whose bias cannot be folded, are refused."""
    model = getattr(model, "module", model)
    cfg = model.config
    if cfg.vision != "vit":
        raise CheckpointError("transformers' CLIPModel only has ViT image towers: export this ResNet model "
                              "with --to open_clip")
    sd, proj_bias = to_openai_state_dict(model)
    if proj_bias:
        raise CheckpointError(f"transformers' CLIPModel has no text projection bias, and this model's cannot be "
                              f"folded into its weights (embed_dim {cfg.embed_dim} > text width {cfg.text_width}): "
                              f"export it with --to open_clip")
    try:
        from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel
    except ImportError:
        raise CheckpointError("exporting to transformers needs transformers (requirements.txt)") from None
    tower = lambda width, layers, heads: dict(hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers,
                                             num_attention_heads=heads, hidden_act=cfg.act, layer_norm_eps=1e-5)
    hf_cfg = CLIPConfig(
        text_config=dict(tower(cfg.text_width, cfg.text_layers, cfg.text_heads), vocab_size=OPENAI_EOT_ID + 1,
                         max_position_embeddings=cfg.context_length, bos_token_id=OPENAI_SOT_ID,
                         eos_token_id=OPENAI_EOT_ID),
        vision_config=dict(tower(cfg.vision_width, cfg.vision_layers[0], cfg.vision_heads),
                           image_size=cfg.image_size, patch_size=cfg.patch_size),
        projection_dim=cfg.embed_dim, logit_scale_init_value=float(model.logit_scale.detach().reshape(())))
    hf = CLIPModel(hf_cfg)
    missing, unexpected = hf.load_state_dict(_openai_layout_to_hf(sd), strict=False)
    if [k for k in missing if not k.endswith("position_ids")] or unexpected:
        raise CheckpointError(f"transformers CLIPModel layout mismatch: missing {missing[:5]} unexpected {unexpected[:5]}")
    hf.save_pretrained(out_dir)
    CLIPImageProcessor(image_mean=list(cfg.image_mean), image_std=list(cfg.image_std),
                       size={"shortest_edge": cfg.image_size},
                       crop_size={"height": cfg.image_size, "width": cfg.image_size}).save_pretrained(out_dir)


def main(argv: Optional[Sequence[str]] = None):
    """python modeling_declip.py export CKPT --to open_clip|transformers OUT"""
    import argparse

    p = argparse.ArgumentParser(description="Export a checkpoint (any format load_model reads) to the open_clip "
                                            "or transformers layout, for open_clip, CLIP_benchmark or HF pipelines.")
    sub = p.add_subparsers(dest="command", required=True)
    e = sub.add_parser("export", help="write CKPT in another library's layout")
    e.add_argument("ckpt", help="the checkpoint or run directory to export")
    e.add_argument("out", help="output directory (new or empty)")
    e.add_argument("--to", choices=("open_clip", "transformers"), default="open_clip",
                   help="open_clip: open_clip_model.safetensors + open_clip_config.json; transformers: a "
                        "save_pretrained directory (ViT models only) (default: open_clip)")
    e.add_argument("--activation", choices=ACTIVATIONS, default=None,
                   help="the activation of a bare state dict, which cannot say it (default: quick_gelu, with a note)")
    args = p.parse_args(argv)
    if os.path.isdir(args.out) and os.listdir(args.out):
        raise CheckpointError(f"{args.out} is not empty; give a new or empty output directory")
    model = load_model(args.ckpt, activation=args.activation)
    (export_open_clip if args.to == "open_clip" else export_transformers)(model, args.out)
    print(f"wrote {args.out} ({args.to})")


if __name__ == "__main__":
    sys.exit(run_main(main))
