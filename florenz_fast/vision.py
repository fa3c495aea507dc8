"""DaViT vision tower and the image-token pipeline (SPEC §2).

Module names follow the transformers-native Florence-2 layout, so that checkpoint import is a rename of prefixes
(florenz_fast/convert.py holds the maps to the released and to Microsoft's original layout).

Shape legend: B batch, C channels, H/W spatial, N = H*W tokens, d encoder width.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import ops
from .config import FlorenzConfig, VisionConfig


class DropPath(nn.Module):
    """Stochastic depth per sample. The frozen DaViT still applies it in train mode (SPEC §7)."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x):
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = torch.rand((x.shape[0],) + (1,) * (x.dim() - 1), dtype=x.dtype, device=x.device)
        return x.div(keep) * torch.floor(mask + keep)


class ConvEmbed(nn.Module):
    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int, padding: int, prenorm: bool):
        super().__init__()
        self.prenorm = prenorm
        self.conv = nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=padding)
        self.norm = nn.LayerNorm(c_in if prenorm else c_out)

    def _norm(self, x_BCHW):
        return self.norm(x_BCHW.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    def forward(self, x_BCHW):
        if self.prenorm:
            x_BCHW = self._norm(x_BCHW)
        x_BCHW = self.conv(x_BCHW)
        return x_BCHW if self.prenorm else self._norm(x_BCHW)


class MLP(nn.Module):
    def __init__(self, dim: int, ratio: float):
        super().__init__()
        self.fc1 = nn.Linear(dim, int(dim * ratio))
        self.fc2 = nn.Linear(int(dim * ratio), dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


_NO_MASK = dict(causal=False)


class WindowAttention(nn.Module):
    """Multi-head attention inside non-overlapping win x win windows; pads H, W up to multiples of win."""

    def __init__(self, dim: int, heads: int, window: int):
        super().__init__()
        self.heads, self.window = heads, window
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x_BHWC):
        B, H, W, C = x_BHWC.shape
        w = self.window
        x = F.pad(x_BHWC, (0, 0, 0, (w - W % w) % w, 0, (w - H % w) % w))
        Hp, Wp = x.shape[1], x.shape[2]
        windows = x.view(B, Hp // w, w, Wp // w, w, C).permute(0, 1, 3, 2, 4, 5).reshape(-1, w * w, C)
        q, k, v = self.qkv(windows).view(windows.shape[0], w * w, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        out = ops.attention(q, k, v, scale=q.shape[-1] ** -0.5, **_NO_MASK)
        out = self.proj(out.transpose(1, 2).reshape(-1, w * w, C))
        out = out.view(B, Hp // w, Wp // w, w, w, C).permute(0, 1, 3, 2, 4, 5).reshape(B, Hp, Wp, C)
        return out[:, :H, :W].reshape(B, H * W, C)


class ChannelAttention(nn.Module):
    """Attention between channels within each of `groups` groups; q is scaled by N^-0.5 (N tokens)."""

    def __init__(self, dim: int, groups: int):
        super().__init__()
        self.groups = groups
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x_BNC):
        B, N, C = x_BNC.shape
        # (3, B, groups, C/groups, N): channels play the role of tokens, tokens the role of the head dim
        q, k, v = self.qkv(x_BNC).view(B, N, 3, self.groups, C // self.groups).permute(2, 0, 3, 4, 1)
        out = ops.attention(q, k, v, scale=N ** -0.5, **_NO_MASK)
        return self.proj(out.permute(0, 3, 1, 2).reshape(B, N, C))


class _Block(nn.Module):
    """dwconv residual -> LayerNorm + attention residual -> dwconv residual -> LayerNorm + MLP residual."""

    def __init__(self, dim: int, attn: nn.Module, attn_name: str, mlp_ratio: float, drop_path: float):
        super().__init__()
        self.conv1 = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.norm1 = nn.LayerNorm(dim)
        setattr(self, attn_name, attn)
        self.attn_name = attn_name
        self.conv2 = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.norm2 = nn.LayerNorm(dim)
        self.ffn = MLP(dim, mlp_ratio)
        self.drop_path1 = DropPath(drop_path)
        self.drop_path2 = DropPath(drop_path)

    def _attn(self, x_BNC, H, W):
        raise NotImplementedError

    def forward(self, x_BCHW):
        B, C, H, W = x_BCHW.shape
        x = (self.conv1(x_BCHW) + x_BCHW).flatten(2).transpose(1, 2)
        x = x + self.drop_path1(self._attn(self.norm1(x), H, W))
        x = x.transpose(1, 2).reshape(B, C, H, W)
        x = (self.conv2(x) + x).flatten(2).transpose(1, 2)
        x = x + self.drop_path2(self.ffn(self.norm2(x)))
        return x.transpose(1, 2).reshape(B, C, H, W)


class SpatialBlock(_Block):
    def __init__(self, dim, heads, window, mlp_ratio, drop_path):
        super().__init__(dim, WindowAttention(dim, heads, window), "window_attn", mlp_ratio, drop_path)

    def _attn(self, x_BNC, H, W):
        return self.window_attn(x_BNC.reshape(x_BNC.shape[0], H, W, -1))


class ChannelBlock(_Block):
    def __init__(self, dim, groups, mlp_ratio, drop_path):
        super().__init__(dim, ChannelAttention(dim, groups), "channel_attn", mlp_ratio, drop_path)

    def _attn(self, x_BNC, H, W):
        return self.channel_attn(x_BNC)


class DaViTBlock(nn.Module):
    def __init__(self, dim, heads, window, mlp_ratio, dp_spatial, dp_channel):
        super().__init__()
        self.spatial_block = SpatialBlock(dim, heads, window, mlp_ratio, dp_spatial)
        self.channel_block = ChannelBlock(dim, heads, mlp_ratio, dp_channel)

    def forward(self, x_BCHW):
        return self.channel_block(self.spatial_block(x_BCHW))


class DaViT(nn.Module):
    """4-stage DaViT; returns the unpooled last-stage map (B, C, H/32, W/32). No head, no final norms."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        rates = torch.linspace(0, cfg.drop_path, 2 * sum(cfg.depths), device="cpu").tolist()
        self.convs = nn.ModuleList()
        self.blocks = nn.ModuleList()
        offset = 0
        for s, dim in enumerate(cfg.dims):
            c_in = 3 if s == 0 else cfg.dims[s - 1]
            self.convs.append(ConvEmbed(c_in, dim, cfg.patch_size[s], cfg.patch_stride[s], cfg.patch_padding[s],
                                        cfg.patch_prenorm[s]))
            self.blocks.append(nn.ModuleList(
                DaViTBlock(dim, cfg.heads[s], cfg.window, cfg.mlp_ratio, rates[offset + 2 * i],
                           rates[offset + 2 * i + 1])
                for i in range(cfg.depths[s])
            ))
            offset += 2 * cfg.depths[s]

    def forward(self, pixels_BCHW):
        x = pixels_BCHW.to(self.convs[0].conv.weight.dtype)
        for conv, stage in zip(self.convs, self.blocks):
            x = conv(x)
            for block in stage:
                x = block(x)
        return x


class PositionEmbedding2D(nn.Module):
    """Learned row and column tables; channels are [column half ; row half]."""

    def __init__(self, num: int, dim: int):
        super().__init__()
        self.row_embeddings = nn.Embedding(num, dim // 2)
        self.column_embeddings = nn.Embedding(num, dim - dim // 2)

    def forward(self, H: int, W: int):  # -> (H, W, C)
        dev = self.row_embeddings.weight.device
        cols = self.column_embeddings(torch.arange(W, device=dev))
        rows = self.row_embeddings(torch.arange(H, device=dev))
        return torch.cat([cols[None].expand(H, W, -1), rows[:, None].expand(H, W, -1)], dim=-1)


def sinusoid_table(num: int, dim: int) -> torch.Tensor:
    """(num, dim) with sin in even and cos in odd channels (Florence-2's temporal embedding)."""
    half, cpu = dim // 2, torch.device("cpu")  # a real table even when the model is built on meta
    freq = torch.exp(torch.arange(half, dtype=torch.float32, device=cpu) * -(math.log(10000.0) / half))
    angle = torch.arange(num, dtype=torch.float32, device=cpu)[:, None] * freq[None]
    table = torch.empty(num, dim, device=cpu)
    table[:, 0::2], table[:, 1::2] = torch.sin(angle), torch.cos(angle)
    return table


class TemporalEmbedding(nn.Module):
    def __init__(self, num: int, dim: int):
        super().__init__()
        self.register_buffer("pos_idx_to_embed", sinusoid_table(num, dim), persistent=True)


class ImageTokenProjector(nn.Module):
    """DaViT map -> encoder image tokens: + 2D position, + temporal(frame 0), prepend the mean, project, norm."""

    def __init__(self, cfg: FlorenzConfig):
        super().__init__()
        v = cfg.vision
        C, d = v.dims[-1], v.projection_dim
        self.image_position_embed = PositionEmbedding2D(v.max_pos_embeddings, C)
        self.visual_temporal_embed = TemporalEmbedding(v.max_temporal_embeddings, C)
        self.image_projection = nn.Linear(C, d, bias=False)
        self.image_proj_norm = nn.LayerNorm(d)

    def forward(self, feats_BCHW):
        B, C, H, W = feats_BCHW.shape
        # DaViT's map is a (B, C, H, W) view of (B, N, C) memory: this transpose is contiguous again
        x_BNC = feats_BCHW.flatten(2).transpose(1, 2)
        # the temporal table is an fp32 buffer: in the activations' dtype, so bf16 weights meet bf16 inputs
        pos_NC = (self.image_position_embed(H, W).reshape(H * W, C)
                  + self.visual_temporal_embed.pos_idx_to_embed[0]).to(x_BNC.dtype)
        norm = self.image_proj_norm
        # x + pos, the mean token first, projection, LayerNorm (fused on the triton backend)
        return ops.image_tokens(x_BNC, pos_NC, self.image_projection.weight, norm.weight, norm.bias, norm.eps)


def check_pixels(pixels: torch.Tensor, cfg: FlorenzConfig) -> None:
    """Raise a ValueError that names the problem for anything the vision tower cannot take."""
    if not isinstance(pixels, torch.Tensor):
        raise TypeError(f"pixel_values must be a torch.Tensor, got {type(pixels).__name__}")
    if pixels.dim() != 4:
        raise ValueError(f"pixel_values must be (B, 3, H, W), got shape {tuple(pixels.shape)}")
    if pixels.shape[1] != 3:
        raise ValueError(f"pixel_values must have 3 channels (RGB), got {pixels.shape[1]} "
                         f"in shape {tuple(pixels.shape)}")
    if not pixels.is_floating_point():
        raise ValueError(f"pixel_values must be a floating dtype (normalised pixels), got {pixels.dtype}")
    stride, limit = cfg.patch_stride_total, cfg.patch_stride_total * cfg.vision.max_pos_embeddings
    H, W = pixels.shape[2:]
    if H % stride or W % stride or H > limit or W > limit:
        raise ValueError(f"image size {H}x{W} is not supported: sides must be multiples of {stride} "
                         f"and at most {limit} (preset {cfg.name!r} expects {cfg.image_size}x{cfg.image_size})")
