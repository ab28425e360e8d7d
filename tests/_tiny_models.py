"""Tiny diffusers transformers for the backend/pass tests (CPU, random weights).

Each factory returns ``(model, make_inputs)`` where ``make_inputs(seed)`` builds a fresh kwargs dict for
``model(**kwargs)``. Projection weights are re-initialised so attention logits spread (docs/design.md, "Tiny test models let attention matter"):
with diffusers' default init a tiny model's attention is nearly uniform and barely affects the output.
Timesteps are drawn from values exactly representable in bf16 (FLUX multiplies them by 1000).
"""

from __future__ import annotations

import torch
from torch import nn

FAMILIES = ["flux", "sd3", "hunyuan", "wan", "cogvideox", "pixart", "dit", "ltx"]

_TIMESTEPS = [1 / 16, 1 / 8, 1 / 4, 1 / 2, 1.0]


def spread_attention(model: nn.Module, std: float = 0.5) -> None:
    """Re-initialise q/k projections (and their added/text counterparts) so logits have std ~3."""
    g = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for name, mod in model.named_modules():
            if isinstance(mod, nn.Linear):
                leaf = name.rsplit(".", 1)[-1]
                if leaf in ("to_q", "to_k", "add_q_proj", "add_k_proj", "to_qkv"):
                    fan_in = mod.in_features
                    mod.weight.copy_(torch.randn(mod.weight.shape, generator=g) * (std * 6 / fan_in**0.5))
                elif leaf in ("to_v", "add_v_proj"):
                    fan_in = mod.in_features
                    mod.weight.copy_(torch.randn(mod.weight.shape, generator=g) / fan_in**0.5)
                elif name.endswith("to_out.0") or leaf == "to_add_out" or (name.startswith("single_transformer_blocks.") and leaf == "proj_out"):
                    fan_in = mod.in_features
                    mod.weight.copy_(torch.randn(mod.weight.shape, generator=g) * (3 / fan_in**0.5))


def _ts(seed: int, batch: int) -> torch.Tensor:
    return torch.tensor([_TIMESTEPS[(seed + i) % len(_TIMESTEPS)] for i in range(batch)])


def flux(batch: int = 1):
    from diffusers import FluxTransformer2DModel

    m = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 6, 6),
    )
    s_img, s_txt = 16, 8

    def make_inputs(seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        ids = torch.zeros(s_img, 3)
        ids[:, 1] = torch.arange(s_img) // 4
        ids[:, 2] = torch.arange(s_img) % 4
        return dict(
            hidden_states=torch.randn(batch, s_img, 16, generator=g),
            encoder_hidden_states=torch.randn(batch, s_txt, 32, generator=g),
            pooled_projections=torch.randn(batch, 32, generator=g),
            timestep=_ts(seed, batch),
            img_ids=ids,
            txt_ids=torch.zeros(s_txt, 3),
            return_dict=False,
        )

    return m, make_inputs


def sd3(batch: int = 1):
    from diffusers import SD3Transformer2DModel

    # layer 0 is an SD3.5-style dual-attention layer (attn + attn2) with qk RMSNorm; the last layer is
    # context_pre_only (its text attention output is discarded).
    m = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, caption_projection_dim=32, pooled_projection_dim=16, out_channels=4,
        pos_embed_max_size=16, dual_attention_layers=(0,), qk_norm="rms_norm",
    )

    def make_inputs(seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        return dict(
            hidden_states=torch.randn(batch, 4, 8, 8, generator=g),
            encoder_hidden_states=torch.randn(batch, 8, 32, generator=g),
            pooled_projections=torch.randn(batch, 16, generator=g),
            timestep=_ts(seed, batch) * 1000,
            return_dict=False,
        )

    return m, make_inputs


def hunyuan(batch: int = 1):
    from diffusers import HunyuanVideoTransformer3DModel

    m = HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=1,
        num_single_layers=1, num_refiner_layers=1, patch_size=1, patch_size_t=1, text_embed_dim=16,
        pooled_projection_dim=8, rope_axes_dim=(4, 8, 4),
    )

    def make_inputs(seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        mask = torch.ones(batch, 8, dtype=torch.long)
        for i in range(batch):
            mask[i, 6 + i % 2:] = 0  # padded text tokens (a different count per batch item)
        return dict(
            hidden_states=torch.randn(batch, 4, 2, 4, 4, generator=g),
            timestep=_ts(seed, batch) * 1000,
            encoder_hidden_states=torch.randn(batch, 8, 16, generator=g),
            encoder_attention_mask=mask,
            pooled_projections=torch.randn(batch, 8, generator=g),
            guidance=torch.full((batch,), 3.0) * 1000,
            return_dict=False,
        )

    return m, make_inputs


def wan(batch: int = 1):
    from diffusers import WanTransformer3DModel

    m = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
        text_dim=16, freq_dim=16, ffn_dim=32, num_layers=2, rope_max_seq_len=32,
    )

    def make_inputs(seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        return dict(
            hidden_states=torch.randn(batch, 4, 2, 8, 8, generator=g),
            timestep=_ts(seed, batch) * 1000,
            encoder_hidden_states=torch.randn(batch, 8, 16, generator=g),
            return_dict=False,
        )

    return m, make_inputs


def cogvideox(batch: int = 1):
    from diffusers import CogVideoXTransformer3DModel

    m = CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=4,
        text_embed_dim=16, num_layers=2, sample_width=8, sample_height=8, sample_frames=9, patch_size=2,
        temporal_compression_ratio=4, max_text_seq_length=8,
    )

    def make_inputs(seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        return dict(
            hidden_states=torch.randn(batch, 3, 4, 8, 8, generator=g),
            encoder_hidden_states=torch.randn(batch, 8, 16, generator=g),
            timestep=_ts(seed, batch) * 1000,
            return_dict=False,
        )

    return m, make_inputs


def pixart(batch: int = 1):
    from diffusers import PixArtTransformer2DModel

    m = PixArtTransformer2DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=2,
        cross_attention_dim=32, sample_size=8, patch_size=2, caption_channels=16, use_additional_conditions=False,
    )

    def make_inputs(seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        mask = torch.ones(batch, 8, dtype=torch.long)
        for i in range(batch):
            mask[i, 6 + i % 2:] = 0
        return dict(
            hidden_states=torch.randn(batch, 4, 8, 8, generator=g),
            encoder_hidden_states=torch.randn(batch, 8, 16, generator=g),
            timestep=_ts(seed, batch) * 1000,
            added_cond_kwargs={"resolution": None, "aspect_ratio": None},
            encoder_attention_mask=mask,
            return_dict=False,
        )

    return m, make_inputs


def dit(batch: int = 1):
    from diffusers import DiTTransformer2DModel

    m = DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=2, sample_size=8,
        patch_size=2, norm_num_groups=1,
    )

    def make_inputs(seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        return dict(
            hidden_states=torch.randn(batch, 4, 8, 8, generator=g),
            timestep=_ts(seed, batch) * 1000,
            class_labels=torch.randint(0, 1000, (batch,), generator=g),
            return_dict=False,
        )

    return m, make_inputs


def ltx(batch: int = 1):
    from diffusers import LTXVideoTransformer3DModel

    m = LTXVideoTransformer3DModel(
        in_channels=8, out_channels=8, num_attention_heads=2, attention_head_dim=16, cross_attention_dim=32,
        num_layers=1, caption_channels=16,
    )

    def make_inputs(seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        mask = torch.ones(batch, 8, dtype=torch.long)
        for i in range(batch):
            mask[i, 6 + i % 2:] = 0
        return dict(
            hidden_states=torch.randn(batch, 2 * 4 * 4, 8, generator=g),
            encoder_hidden_states=torch.randn(batch, 8, 16, generator=g),
            timestep=_ts(seed, batch) * 1000,
            encoder_attention_mask=mask,
            num_frames=2,
            height=4,
            width=4,
            return_dict=False,
        )

    return m, make_inputs


def build(family: str, batch: int = 1, seed: int = 0):
    torch.manual_seed(seed)
    model, make_inputs = globals()[family](batch)
    spread_attention(model)
    model.eval()
    return model, make_inputs
