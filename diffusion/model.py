"""The noise-predicting U-Net: (x_t, t, label) -> eps. By default it sees 28x28 digits as 14x14 maps of 2x2 pixel
patches (pixel-unshuffle), so no convolution runs at full resolution, where a CPU spends most of a step's time.
Whatever mix of x_0 and eps the network learns to output (--prediction), forward returns eps, so samplers, guidance
and the likelihood never ask."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from diffusion.config import SIGMA_DATA
from diffusion.diffusion_utils import preconditioning, schedule_from_config, values_at
from diffusion.errors import UserError


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of integer timesteps (Vaswani et al. 2017), shape (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


TIME_FREQS = 64  # sinusoid size: enough frequencies to tell t = 3 from t = 4 and t = 900 from t = 950


def norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(8, channels)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, with the time(+label) embedding added in between."""

    def __init__(self, c_in: int, c_out: int, emb_dim: int, dropout: float):
        super().__init__()
        self.conv1 = nn.Sequential(norm(c_in), nn.SiLU(), nn.Conv2d(c_in, c_out, 3, padding=1))
        self.emb = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, c_out))
        self.conv2 = nn.Sequential(norm(c_out), nn.SiLU(), nn.Dropout(dropout), nn.Conv2d(c_out, c_out, 3, padding=1))
        nn.init.zeros_(self.conv2[-1].weight)  # each block starts as the identity
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(x) + self.emb(emb)[:, :, None, None]
        return self.skip(x) + self.conv2(h)


class Attention(nn.Module):
    """Multi-head self-attention over the pixels of a (small) feature map, with a residual."""

    def __init__(self, channels: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm = norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.out = nn.Conv2d(channels, channels, 1)
        nn.init.zeros_(self.out.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, h * w).transpose(-1, -2).unbind(1)
        y = F.scaled_dot_product_attention(q, k, v)  # (B, heads, HW, C/heads)
        return x + self.out(y.transpose(-1, -2).reshape(b, c, h, w))


class ResolutionLevel(nn.Module):
    """Residual blocks at one resolution, each optionally followed by attention."""

    def __init__(self, c_ins: list[int], c_out: int, emb_dim: int, dropout: float, attention_heads: int):
        """attention_heads 0: no attention."""
        super().__init__()
        self.blocks = nn.ModuleList(ResBlock(c, c_out, emb_dim, dropout) for c in c_ins)
        self.attn = nn.ModuleList(Attention(c_out, attention_heads) if attention_heads else nn.Identity() for _ in c_ins)


class UNet(nn.Module):
    """U-Net epsilon-predictor. forward(x (B,C,H,W), t (B,) int, y (B,) int or None) -> (B,C,H,W).
    patch_size p > 1 folds each p x p patch into channels first (B, C p^2, H/p, W/p) and unfolds the output.
    `preconditioning` (c_in, c_xt, c_net), each (T,), makes the network's output F a mix read back as
    eps = c_xt x_t + c_net F(c_in x_t); None: F is eps (diffusion_utils.preconditioning)."""

    def __init__(self, channels: int = 1, image_size: int = 28, base_channels: int = 32,
                 channel_mults: tuple[int, ...] = (1, 2, 2), num_res_blocks: int = 1,
                 attention_resolutions: tuple[int, ...] = (7,), num_classes: int = 10, dropout: float = 0.0,
                 patch_size: int = 1, preconditioning: tuple[torch.Tensor, ...] | None = None,
                 attention_heads: int = 1, level_skips: bool = True, stem_skip: bool = True):
        super().__init__()
        self.preconditioned = preconditioning is not None
        if self.preconditioned:  # constants of the schedule, not weights: rebuilt from the config, never saved
            for name, values in zip(("c_in", "c_xt", "c_net"), preconditioning):
                self.register_buffer(name, values.float(), persistent=False)
        self.patch_size = patch_size
        self.factor = patch_size * 2 ** (len(channel_mults) - 1)
        assert image_size % self.factor == 0, f"image size {image_size} must divide by {self.factor}"
        self.num_classes = num_classes
        emb_dim = 4 * base_channels
        self.time_mlp = nn.Sequential(nn.Linear(TIME_FREQS, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        # one extra "no label" class (index num_classes) for classifier-free guidance
        self.label_emb = nn.Embedding(num_classes + 1, emb_dim) if num_classes else None
        patch_channels = channels * patch_size**2
        self.conv_in = nn.Conv2d(patch_channels, base_channels, 3, padding=1)

        widths = [base_channels * m for m in channel_mults]
        # Ho et al.'s U-Net also passes each level's input across (the stem's output at the first level, a
        # downsampling's below) and takes it up with one more block at that level; each kind can be left out
        self.level_skips, self.stem_skip = level_skips, stem_skip
        self.down, self.downsample = nn.ModuleList(), nn.ModuleList()
        skips = [base_channels] if stem_skip else []
        c, res = base_channels, image_size // patch_size
        for i, w in enumerate(widths):
            heads = attention_heads if res in attention_resolutions else 0
            self.down.append(ResolutionLevel([c] + [w] * (num_res_blocks - 1), w, emb_dim, dropout, heads))
            skips += [w] * num_res_blocks
            c = w
            if i + 1 < len(widths):
                self.downsample.append(nn.Conv2d(c, c, 3, stride=2, padding=1))
                skips += [c] if level_skips else []
                res //= 2
        self.mid = ResolutionLevel([c, c], c, emb_dim, dropout, attention_heads=0)
        self.mid_attn = Attention(c, attention_heads)
        self.up, self.upsample = nn.ModuleList(), nn.ModuleList()
        for i, w in reversed(list(enumerate(widths))):
            c_ins = []
            for _ in range(num_res_blocks + (stem_skip if i == 0 else level_skips)):
                c_ins.append(c + skips.pop())
                c = w
            self.up.append(ResolutionLevel(c_ins, w, emb_dim, dropout, attention_heads if res in attention_resolutions else 0))
            if i > 0:
                self.upsample.append(nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"),
                                                   nn.Conv2d(c, c, 3, padding=1)))
                res *= 2
        self.out = nn.Sequential(norm(c), nn.SiLU(), nn.Conv2d(c, patch_channels, 3, padding=1))
        nn.init.zeros_(self.out[-1].weight)
        nn.init.zeros_(self.out[-1].bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        if not self.preconditioned:
            return self.network(x, t, y)
        out = self.network(values_at(self.c_in, t, x) * x, t, y)
        return values_at(self.c_xt, t, x) * x + values_at(self.c_net, t, x) * out.to(x.dtype)

    def network(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        """The U-Net's own output F for input x."""
        assert x.shape[-1] % self.factor == 0 and x.shape[-2] % self.factor == 0, "input size must divide by the U-Net factor"
        emb = self.time_mlp(timestep_embedding(t, TIME_FREQS))
        if self.label_emb is not None:
            y = torch.full_like(t, self.num_classes) if y is None else y
            emb = emb + self.label_emb(y)
        if self.patch_size > 1:
            x = F.pixel_unshuffle(x, self.patch_size)  # (B, C p^2, H/p, W/p)
        h = self.conv_in(x)
        skips = [h] if self.stem_skip else []
        for i, level in enumerate(self.down):
            for block, attn in zip(level.blocks, level.attn):
                h = attn(block(h, emb))
                skips.append(h)
            if i < len(self.downsample):
                h = self.downsample[i](h)  # (B, C, H/2, W/2)
                skips += [h] if self.level_skips else []
        h = self.mid_attn(self.mid.blocks[0](h, emb))
        h = self.mid.blocks[1](h, emb)
        for i, level in enumerate(self.up):
            for block, attn in zip(level.blocks, level.attn):
                h = attn(block(torch.cat([h, skips.pop()], dim=1), emb))
            if i < len(self.upsample):
                h = self.upsample[i](h)
        h = self.out(h)
        return F.pixel_shuffle(h, self.patch_size) if self.patch_size > 1 else h


def output_coefficients(cfg) -> tuple[torch.Tensor, ...] | None:
    """(c_in, c_xt, c_net) for the config's --prediction, from its schedule in float64 on the CPU (Apple's MPS has
    no float64); None for eps."""
    if cfg.prediction == "eps":
        return None
    return preconditioning(schedule_from_config(cfg, torch.float64).alpha_bar, SIGMA_DATA[cfg.prediction])


MAX_PARAMETERS = 200_000_000  # far above any MNIST U-Net; a config past it is a mistake, not a model


def build_model(cfg, dropout: float = 0.0) -> UNet:
    """The U-Net a ModelConfig describes. Its size is counted first on the meta device (no memory), so an absurd
    config from a file someone sent is refused before gigabytes are allocated."""
    coefficients = output_coefficients(cfg)

    def make():
        return UNet(cfg.channels, cfg.image_size, cfg.base_channels, cfg.channel_mults, cfg.num_res_blocks,
                    cfg.attention_resolutions, cfg.num_classes, dropout, cfg.patch_size, coefficients,
                    cfg.attention_heads, cfg.level_skips, cfg.stem_skip)
    with torch.device("meta"):
        size = sum(p.numel() for p in make().parameters())
    if size > MAX_PARAMETERS:
        raise UserError(f"this model config builds {size / 1e6:.0f}M parameters, more than the {MAX_PARAMETERS / 1e6:.0f}M "
                        "this project allows; check --base-channels, --channel-mults and --num-res-blocks")
    return make()
