"""The zoo model: a tiny text encoder + diffusers' ``FluxTransformer2DModel`` in pixel space.

* Image: 64x64 RGB in [-1, 1] is the latent itself (no VAE); FLUX's 2x2 packing turns it into
  32 x 32 = 1,024 tokens of 12 channels (``pack`` / ``unpack``), with FLUX's ``img_ids``
  ``(0, row, col)`` for RoPE.
* Text: ``TextEncoder`` (embedding table over the grammar's vocabulary + learned positions + a few
  pre-norm transformer layers) gives ``encoder_hidden_states [B, 12, 128]`` (``txt_ids`` all zero, as
  in FLUX; word order is carried by the learned positions) and ``pooled_projections`` = the
  ``<cls>`` token's output.
* DiT: ``FluxTransformer2DModel`` (2 joint blocks + 3 single blocks, RoPE), hidden 256 = 4 heads x 64,
  ~8.1 M parameters; the text encoder adds ~0.4 M. Stored in fp16: ~17 MB (the DiT file 15.4 MiB,
  under the device machine's 16 MiB per returned file).

Flow matching convention (as FLUX / ``FlowMatchEulerDiscreteScheduler``): ``x_t = (1 - t) x0 + t noise``,
the transformer gets ``timestep = t`` in [0, 1] (it multiplies by 1000 itself) and predicts
``v = noise - x0``.
"""

from __future__ import annotations

import copy
import json
import os
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from . import data

IMAGE_SIZE = 64
PATCH = 2  # FLUX 2x2 packing
CHANNELS = 3

DIT_CONFIG = dict(
    patch_size=1,
    in_channels=CHANNELS * PATCH * PATCH,
    out_channels=None,
    num_layers=2,
    num_single_layers=3,
    attention_head_dim=64,
    num_attention_heads=4,
    joint_attention_dim=128,
    pooled_projection_dim=128,
    guidance_embeds=False,
    axes_dims_rope=[8, 28, 28],
)

TEXT_CONFIG = dict(vocab_size=len(data.VOCAB), max_len=data.MAX_LEN, dim=128, num_layers=2, num_heads=2, mlp_ratio=4)

SAMPLER_CONFIG = dict(
    scheduler="FlowMatchEulerDiscreteScheduler",
    scheduler_config=dict(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False),
    num_inference_steps=28,
    guidance_scale=4.0,
)

# Tiny variant for CPU tests (same code paths, ~0.1 M parameters).
TINY_DIT_CONFIG = dict(DIT_CONFIG, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
                       joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 6, 6])
TINY_TEXT_CONFIG = dict(TEXT_CONFIG, dim=32, num_layers=1, num_heads=2)


def default_config(tiny: bool = False, image_size: int = IMAGE_SIZE) -> dict:
    """The full ``config.json`` structure (model configs + data + sampler)."""
    return dict(
        format=1,
        dit=copy.deepcopy(TINY_DIT_CONFIG if tiny else DIT_CONFIG),
        text_encoder=copy.deepcopy(TINY_TEXT_CONFIG if tiny else TEXT_CONFIG),
        data=dict(image_size=image_size, channels=CHANNELS, patch=PATCH, vocab=list(data.VOCAB), max_len=data.MAX_LEN),
        sampler=copy.deepcopy(SAMPLER_CONFIG),
    )


# ------------------------------------------------------------------------------------- text encoder


class _TextBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: int):
        super().__init__()
        self.num_heads = num_heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, mlp_ratio * dim)
        self.fc2 = nn.Linear(mlp_ratio * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, D = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(B, L, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v)  # no padding mask: pads are ordinary learned tokens
        x = x + self.proj(a.transpose(1, 2).reshape(B, L, D))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class TextEncoder(nn.Module):
    """Tokens ``[B, L]`` -> ``(hidden [B, L, dim], pooled [B, dim])`` (pooled = the ``<cls>`` output)."""

    def __init__(self, vocab_size: int, max_len: int, dim: int, num_layers: int, num_heads: int, mlp_ratio: int = 4):
        super().__init__()
        self.config = dict(vocab_size=vocab_size, max_len=max_len, dim=dim, num_layers=num_layers,
                           num_heads=num_heads, mlp_ratio=mlp_ratio)
        self.embed = nn.Embedding(vocab_size, dim)
        self.pos = nn.Parameter(torch.zeros(max_len, dim))
        self.blocks = nn.ModuleList([_TextBlock(dim, num_heads, mlp_ratio) for _ in range(num_layers)])
        self.norm = nn.LayerNorm(dim)
        nn.init.normal_(self.embed.weight, std=0.02)
        nn.init.normal_(self.pos, std=0.02)

    def forward(self, tokens: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        x = self.embed(tokens) + self.pos[: tokens.shape[1]]
        for blk in self.blocks:
            x = blk(x)
        x = self.norm(x)
        return x, x[:, 0]


# ---------------------------------------------------------------------------------------------- DiT


def build_transformer(config: dict, zero_init: bool = True):
    """``FluxTransformer2DModel(**config)``. ``zero_init``: adaLN-zero (DiT) for training from scratch —
    every modulation linear and the final projection start at zero, so each block starts as the identity
    and the model's first output is 0. The random-weight reference model of the attention report uses
    ``zero_init=False`` (diffusers' default init)."""
    from diffusers import FluxTransformer2DModel

    cfg = dict(config)
    cfg["axes_dims_rope"] = tuple(cfg["axes_dims_rope"])
    model = FluxTransformer2DModel(**cfg)
    if zero_init:
        with torch.no_grad():
            for name, mod in model.named_modules():
                if isinstance(mod, nn.Linear) and (
                    name.endswith("norm1.linear") or name.endswith("norm1_context.linear")
                    or name.endswith("norm.linear") or name in ("norm_out.linear", "proj_out")
                ):
                    mod.weight.zero_()
                    if mod.bias is not None:
                        mod.bias.zero_()
    return model


def build_text_encoder(config: dict) -> TextEncoder:
    return TextEncoder(**config)


def pack(images: torch.Tensor, patch: int = PATCH) -> torch.Tensor:
    """``[B, C, H, W]`` -> ``[B, (H/p)(W/p), C p p]`` (FLUX's ``_pack_latents`` order)."""
    B, C, H, W = images.shape
    x = images.view(B, C, H // patch, patch, W // patch, patch).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(B, (H // patch) * (W // patch), C * patch * patch)


def unpack(tokens: torch.Tensor, image_size: int, patch: int = PATCH) -> torch.Tensor:
    B, N, CP = tokens.shape
    h = w = image_size // patch
    C = CP // (patch * patch)
    x = tokens.view(B, h, w, C, patch, patch).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(B, C, h * patch, w * patch)


def image_ids(image_size: int, patch: int = PATCH, device=None) -> torch.Tensor:
    """FLUX ``img_ids [N, 3]``: ``(0, row, col)`` of each packed token."""
    h = w = image_size // patch
    ids = torch.zeros(h, w, 3, device=device)
    ids[..., 1] = torch.arange(h, device=device)[:, None]
    ids[..., 2] = torch.arange(w, device=device)[None, :]
    return ids.reshape(h * w, 3)


def text_ids(length: int, device=None) -> torch.Tensor:
    return torch.zeros(length, 3, device=device)


def predict(transformer, x_t: torch.Tensor, t: torch.Tensor, text_hidden: torch.Tensor, pooled: torch.Tensor,
            img_ids: torch.Tensor, txt_ids: torch.Tensor) -> torch.Tensor:
    """One transformer call: packed ``x_t [B, N, C]``, ``t [B]`` in [0, 1] -> ``v [B, N, C]``."""
    return transformer(hidden_states=x_t, encoder_hidden_states=text_hidden, pooled_projections=pooled, timestep=t,
                       img_ids=img_ids, txt_ids=txt_ids, return_dict=False)[0]


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ------------------------------------------------------------------------------------------- saving

DIT_FILE, TEXT_FILE, CONFIG_FILE = "dit.safetensors", "text_encoder.safetensors", "config.json"


def save(out_dir: str, transformer, text_encoder, config: dict, dtype=torch.float16) -> dict:
    """Write ``dit.safetensors``, ``text_encoder.safetensors`` (``dtype``) and ``config.json``; returns
    ``{file: bytes}``."""
    from safetensors.torch import save_file

    os.makedirs(out_dir, exist_ok=True)
    sizes = {}
    for fname, mod in ((DIT_FILE, transformer), (TEXT_FILE, text_encoder)):
        sd = {k: v.detach().to("cpu", dtype).contiguous() for k, v in mod.state_dict().items()}
        path = os.path.join(out_dir, fname)
        save_file(sd, path, metadata={"format": "pt", "dtype": str(dtype).replace("torch.", "")})
        os.chmod(path, 0o644)  # safetensors writes 0600; package data must be world-readable
        sizes[fname] = os.path.getsize(path)
    with open(os.path.join(out_dir, CONFIG_FILE), "w") as f:
        json.dump(config, f, indent=2)
    return sizes


def load(weights_dir: Optional[str] = None, device="cpu", dtype=torch.float32):
    """``(transformer, text_encoder, config)`` from a directory written by ``save`` (default: the weights
    shipped in the package, ``omni_compile/zoo/weights``), in eval mode on ``device`` / ``dtype``."""
    from safetensors.torch import load_file

    weights_dir = weights_dir or default_weights_dir()
    cfg_path = os.path.join(weights_dir, CONFIG_FILE)
    if not os.path.exists(cfg_path):
        raise FileNotFoundError(f"no {CONFIG_FILE} in {weights_dir}: train with `python -m omni_compile.zoo.train --out DIR`")
    with open(cfg_path) as f:
        config = json.load(f)
    transformer = build_transformer(config["dit"], zero_init=False)
    text_encoder = build_text_encoder(config["text_encoder"])
    for fname, mod in ((DIT_FILE, transformer), (TEXT_FILE, text_encoder)):
        sd = load_file(os.path.join(weights_dir, fname))
        mod.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True)
    return to_inference(transformer, device, dtype), to_inference(text_encoder, device, dtype), config


def to_inference(module: nn.Module, device="cpu", dtype=torch.float32) -> nn.Module:
    """Eval mode, no grads, on ``device``; cast only when ``dtype`` is not fp32 (diffusers warns on any
    ``.to(dtype)`` call)."""
    module = module.to(device)
    if dtype != torch.float32:
        module = module.to(dtype)
    return module.eval().requires_grad_(False)


def default_weights_dir() -> str:
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights")


__all__ = [
    "DIT_CONFIG", "TEXT_CONFIG", "SAMPLER_CONFIG", "TINY_DIT_CONFIG", "TINY_TEXT_CONFIG", "default_config",
    "TextEncoder", "build_transformer", "build_text_encoder", "pack", "unpack", "image_ids", "text_ids", "predict",
    "count_parameters", "save", "load", "to_inference", "default_weights_dir", "DIT_FILE", "TEXT_FILE", "CONFIG_FILE",
]
