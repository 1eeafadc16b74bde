"""The plain baseline: facebookresearch/mae's models_mae.py adapted to 3D, written the obvious way in plain
PyTorch (no seiscli code), timed on random volumes.

What a user would write from the MAE paper's code: a Conv3d patch embedding over the whole volume, a fixed
(N + 1, D) sin-cos position table, per-sample random masking by argsort of noise, timm-style blocks using
F.scaled_dot_product_attention with PyTorch's default kernel choice, a decoder over all N + 1 tokens after
unshuffling, the loss over all patches weighted by the mask, bf16 autocast and torch.optim.AdamW with its
defaults. `python benchmarks/reference_mae.py --crop 640 640 1024` times it alone; bench_gpu.py runs it
next to the product's model in the same process.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn


def sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0))
    out = pos.reshape(-1, 1).double() * omega
    return torch.cat([out.sin(), out.cos()], dim=1)


def sincos_3d_table(dim: int, grid: tuple[int, int, int], cls_token: bool) -> torch.Tensor:
    """MAE's 2D table with a third axis: the channels split over z, y, x (each part even)."""
    dz = dy = (dim // 3) // 2 * 2
    dx = dim - dz - dy
    z, y, x = torch.meshgrid(*(torch.arange(g) for g in grid), indexing="ij")
    t = torch.cat([sincos_1d(dz, z), sincos_1d(dy, y), sincos_1d(dx, x)], dim=1).float()
    return torch.cat([torch.zeros(1, dim), t]) if cls_token else t


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class MAE3D(nn.Module):
    def __init__(
        self,
        crop: tuple[int, int, int],
        patch: int = 16,
        in_chans: int = 1,
        embed_dim: int = 1024,
        depth: int = 24,
        heads: int = 16,
        decoder_dim: int = 512,
        decoder_depth: int = 8,
        decoder_heads: int = 8,
        mask_ratio: float = 0.75,
        norm_pix_loss: bool = True,
    ) -> None:
        super().__init__()
        self.patch, self.mask_ratio, self.norm_pix_loss = patch, mask_ratio, norm_pix_loss
        self.grid = (crop[0] // patch, crop[1] // patch, crop[2] // patch)
        self.patch_embed = nn.Conv3d(in_chans, embed_dim, kernel_size=patch, stride=patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.register_buffer("pos_embed", sincos_3d_table(embed_dim, self.grid, True).unsqueeze(0))
        self.blocks = nn.ModuleList(Block(embed_dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.decoder_embed = nn.Linear(embed_dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.register_buffer("decoder_pos_embed", sincos_3d_table(decoder_dim, self.grid, True).unsqueeze(0))
        self.decoder_blocks = nn.ModuleList(Block(decoder_dim, decoder_heads) for _ in range(decoder_depth))
        self.decoder_norm = nn.LayerNorm(decoder_dim, eps=1e-6)
        self.decoder_pred = nn.Linear(decoder_dim, patch**3 * in_chans)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        p = self.patch
        b, c = x.shape[:2]
        gz, gy, gx = self.grid
        x = x.reshape(b, c, gz, p, gy, p, gx, p).permute(0, 2, 4, 6, 3, 5, 7, 1)
        return x.reshape(b, gz * gy * gx, p**3 * c)

    def random_masking(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, n, d = x.shape
        keep = int(n * (1 - self.mask_ratio))
        ids_shuffle = torch.argsort(torch.rand(b, n, device=x.device), dim=1)
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        x_masked = torch.gather(x, 1, ids_shuffle[:, :keep].unsqueeze(-1).expand(-1, -1, d))
        mask = torch.ones(b, n, device=x.device)
        mask[:, :keep] = 0
        return x_masked, torch.gather(mask, 1, ids_restore), ids_restore

    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(imgs).flatten(2).transpose(1, 2) + self.pos_embed[:, 1:]
        x, mask, ids_restore = self.random_masking(x)
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)
        for blk in self.blocks:
            x = blk(x)
        x = self.decoder_embed(self.norm(x))
        mask_tokens = self.mask_token.expand(x.shape[0], ids_restore.shape[1] + 1 - x.shape[1], -1)
        x_ = torch.cat([x[:, 1:], mask_tokens], dim=1)
        x_ = torch.gather(x_, 1, ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[2]))
        x = torch.cat([x[:, :1], x_], dim=1) + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            x = blk(x)
        pred = self.decoder_pred(self.decoder_norm(x))[:, 1:]
        target = self.patchify(imgs)
        if self.norm_pix_loss:
            mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1.0e-6) ** 0.5
        loss = ((pred.float() - target) ** 2).mean(dim=-1)
        return (loss * mask).sum() / mask.sum()


def time_training(
    crop: tuple[int, int, int], micro_batch: int, steps: int, warmup: int, device: torch.device, **model_kw: object
) -> dict[str, float]:
    """Median step time (forward, backward, AdamW step, synchronised) and peak memory on random volumes."""
    torch.manual_seed(0)
    model = MAE3D(crop, **model_kw).to(device)  # type: ignore[arg-type]
    opt = torch.optim.AdamW(model.parameters(), lr=1.5e-4, betas=(0.9, 0.95), weight_decay=0.05)
    host = torch.randn(micro_batch, 1, *crop)
    if device.type == "cuda":
        host = host.pin_memory()
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        x = host.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = model(x)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss_value = loss.item()  # synchronises, as a training loop logging its loss does
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    out = {"step_time_s": statistics.median(times), "loss": loss_value, "timed_steps": steps}
    if device.type == "cuda":
        out["max_mem_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--crop", type=int, nargs=3, default=[640, 640, 1024])
    ap.add_argument("--micro-batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    r = time_training(tuple(args.crop), args.micro_batch, args.steps, args.warmup, device)
    print(json.dumps({**r, "samples_per_s": args.micro_batch / r["step_time_s"]}))


if __name__ == "__main__":
    main()
