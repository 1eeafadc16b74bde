"""Analytic FLOPs of one training sample of the asymmetric 3D MAE (research notes section 6.2).

Model-FLOPs convention: 2 FLOPs per multiply-add, matmuls only (norms, GELU, softmax and adds are not
counted), training = 3 x forward (backward = 2 x forward; activation-checkpointing recompute and the
flash-attention backward's recompute are not counted, as in MFU).

With N tokens, V visible patches, K = in_chans * p^3 values per patch, a block of width d, MLP width h and
sequence length S costs, forward:
    linear    2 S (3d^2 + d^2 + 2 d h)     (fused qkv, out projection, two MLP matmuls)
    attention 4 S^2 d                       (Q K^T and A V over all heads, non-causal)
The encoder runs on S_e = V + 1 tokens (visible + cls), the decoder on S_d = N tokens (no cls), and
    patch embed    2 V K d_e               (only visible patches are embedded)
    decoder_embed  2 V d_e d_d             (the cls token is dropped before it)
    decoder_pred   2 (N - V) d_d K         (predictions are made for masked tokens only)
so forward = L_e (linear_e + attn_e) + L_d (linear_d + attn_d) + io, and training = 3 x forward.
With context parallelism the sample is split over ranks but the attention is global, so the per-sample
count does not depend on P (V + 1 = E P from the masking plan).
"""

from __future__ import annotations

from dataclasses import dataclass

from seiscli.recipe import Recipe
from seiscli.train.model.masking import Plan

# Dense bf16 datasheet peaks per GPU, matched on the device name.
PEAK_BF16_FLOPS: dict[str, float] = {"H200": 989e12, "H100": 989e12, "A100": 312e12}


@dataclass(frozen=True)
class MAEFlops:
    encoder_linear: int
    encoder_attention: int
    decoder_linear: int
    decoder_attention: int
    io: int

    @property
    def forward(self) -> int:
        return self.encoder_linear + self.encoder_attention + self.decoder_linear + self.decoder_attention + self.io

    @property
    def train(self) -> int:
        return 3 * self.forward

    @property
    def attention_share(self) -> float:
        return (self.encoder_attention + self.decoder_attention) / self.forward


def _block_linear(seq: int, dim: int, hidden: int) -> int:
    return 2 * seq * (4 * dim * dim + 2 * dim * hidden)


def mae_flops(
    *,
    n_tokens: int,
    n_visible: int,
    patch_values: int,
    encoder_depth: int,
    encoder_dim: int,
    decoder_depth: int,
    decoder_dim: int,
    mlp_ratio: float,
) -> MAEFlops:
    """Forward FLOPs of one sample, by part; see the module docstring for the formula."""
    s_e, s_d = n_visible + 1, n_tokens
    h_e, h_d = int(encoder_dim * mlp_ratio), int(decoder_dim * mlp_ratio)
    return MAEFlops(
        encoder_linear=encoder_depth * _block_linear(s_e, encoder_dim, h_e),
        encoder_attention=encoder_depth * 4 * s_e * s_e * encoder_dim,
        decoder_linear=decoder_depth * _block_linear(s_d, decoder_dim, h_d),
        decoder_attention=decoder_depth * 4 * s_d * s_d * decoder_dim,
        io=2 * n_visible * patch_values * encoder_dim
        + 2 * n_visible * encoder_dim * decoder_dim
        + 2 * (n_tokens - n_visible) * decoder_dim * patch_values,
    )


def recipe_flops(recipe: Recipe, plan: Plan) -> MAEFlops:
    m = recipe.model
    return mae_flops(
        n_tokens=plan.n_tokens,
        n_visible=plan.visible,
        patch_values=m.in_chans * m.patch_size**3,
        encoder_depth=m.encoder_depth,
        encoder_dim=m.encoder_dim,
        decoder_depth=m.decoder_depth,
        decoder_dim=m.decoder_dim,
        mlp_ratio=m.mlp_ratio,
    )


def peak_flops(device_name: str) -> float | None:
    """Datasheet dense bf16 peak of a GPU named like `NVIDIA H100 80GB HBM3`, or None when unknown."""
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in device_name), None)
