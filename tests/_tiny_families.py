"""Tiny diffusers transformers of the families beyond the eight of ``_tiny_models.py`` (CPU, random weights),
each called the way its diffusers 0.42.1 pipeline calls it.

Each factory ``f(batch=1)`` returns ``(model, make_inputs)``; ``make_inputs(seed=0, t=None)`` builds a fresh
kwargs dict for ``model(**kwargs)``:

* ``t`` is the scheduler's position in (0, 1], 1 = pure noise, falling over the loop (a flow-matching sigma, or
  ``timestep / 1000`` of a DDPM-style schedule). The factory turns it into the value the pipeline actually
  passes (``META[name].convert``): ``1000 * t``, ``t``, ``1 - t`` (Lumina2/Lumina-Next), ``1000 * (1 - t)``
  (Mochi), or an integer timestep. ``t=None`` draws one of 1/16 … 1 from the seed (exactly representable).
* masks, ids, RoPE tables and extra conditioning are built as the pipeline builds them (padded text with a
  different count of pad tokens per batch item where the pipeline passes a text mask).
* ``batch`` is the batch the transformer sees: for ``META[name].cfg == "batch"`` pipelines (CFG as one call
  of 2B) use an even batch; for ``"two_calls"`` pipelines call the model twice per step (cond, uncond) with
  the same ``t`` and different seeds (``neg=True`` where the negative prompt has another length).

``META`` holds, per family: class, pipeline file read, the timestep argument's name, its scale (the value
passed at pure noise), direction over the loop, dtype, CFG form, and notes. ``build(name, batch, seed)``
builds, re-initialises attention projections so attention matters (docs/design.md, "Tiny test models let
attention matter") and puts the model in eval mode. Configs: 1-2 layers, 2 heads, head dim 16 where the
constructor allows it, a handful of tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import nn

_TIMESTEPS = [1 / 16, 1 / 8, 1 / 4, 1 / 2, 1.0]


@dataclass(frozen=True)
class Meta:
    cls: str
    pipeline: str
    timestep_arg: str = "timestep"
    convert: str = "1000*t"  # what the pipeline passes for scheduler position t (1 = noise)
    direction: str = "decreasing"  # of the passed value over the loop
    dtype: str = "float"
    cfg: str = "batch"  # "batch" (one call of 2B), "two_calls" (cond, uncond), "none"
    notes: str = ""
    attention_names: tuple = field(default_factory=tuple)  # extra q/k projection leaf names to re-initialise


META: dict = {}
FAMILIES: list = []


def family(meta: Meta):
    def deco(fn):
        META[fn.__name__] = meta
        FAMILIES.append(fn.__name__)
        return fn
    return deco


def _t(seed: int, t: Optional[float]) -> float:
    return _TIMESTEPS[seed % len(_TIMESTEPS)] if t is None else float(t)


def _tvec(value: float, batch: int, dtype=torch.float32) -> torch.Tensor:
    return torch.full((batch,), value, dtype=dtype)


def _pad_mask(batch: int, length: int, keep: int = 6, dtype=torch.long) -> torch.Tensor:
    """Text mask as a tokenizer gives it: item i keeps ``keep + i % 2`` tokens (a different pad count per item)."""
    m = torch.zeros(batch, length, dtype=dtype)
    for i in range(batch):
        m[i, : min(length, keep + i % 2)] = 1
    return m


_QK = ("to_q", "to_k", "add_q_proj", "add_k_proj", "to_qkv", "qkv", "q_proj", "k_proj", "to_added_qkv",
       "qkv_proj", "img_qkv", "txt_qkv", "wq", "wk", "linear1", "to_q_c", "to_k_c", "to_q_t", "to_k_t")
_V = ("to_v", "add_v_proj", "v_proj", "wv")
_OUT = ("to_add_out", "o_proj", "wo", "proj_attn")


def _shape(v) -> bool:
    return isinstance(v, tuple) and bool(v) and all(isinstance(x, int) for x in v)


def _inputs(batch: int, timestep: Callable, arg: str = "timestep", dtype=torch.float32, negative: Optional[dict] = None,
            **spec):
    """``make_inputs(seed=0, t=None)`` for one pipeline's call: an entry given as a tuple of ints is drawn as
    ``randn(batch, *shape)`` from the seed's generator (in the order given), a callable is called with that
    generator, anything else passes as is; ``arg`` gets ``timestep(t)`` for every item (``t``: the scheduler's
    position, 1 = noise). ``negative``: the entries the negative prompt's call changes, for a two-call CFG
    pipeline that pads each call's prompt to its own length (``make_inputs`` then takes ``neg=True``)."""

    def draw(seed, t, entries):
        g = torch.Generator().manual_seed(seed)
        out = {k: torch.randn(batch, *v, generator=g) if _shape(v) else v(g) if callable(v) else v
               for k, v in entries.items()}
        out[arg] = _tvec(timestep(_t(seed, t)), batch, dtype)
        out["return_dict"] = False
        return out

    if negative is None:
        return lambda seed=0, t=None: draw(seed, t, spec)
    return lambda seed=0, t=None, neg=False: draw(seed, t, {**spec, **negative} if neg else spec)


_SCALED = lambda t: 1000 * t  # noqa: E731  (what most pipelines pass: 1000 x the scheduler's position)
_RAW = lambda t: t  # noqa: E731
_RISING = lambda t: 1 - t  # noqa: E731
_DDIM = lambda t: int(999 * t)  # noqa: E731


def _spread_attention(model: nn.Module, std: float = 0.5, extra_qk: tuple = ()) -> None:
    """Re-initialise q/k projections (fused ones included) so logits spread (std ~3), v and output projections
    at unit/3x gain: with diffusers' default init a tiny model's attention is nearly uniform."""
    g = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for name, mod in model.named_modules():
            if not isinstance(mod, nn.Linear):
                continue
            leaf = name.rsplit(".", 1)[-1]
            fan_in = mod.in_features
            if leaf in _QK or leaf in extra_qk:
                mod.weight.copy_(torch.randn(mod.weight.shape, generator=g) * (std * 6 / fan_in**0.5))
            elif leaf in _V:
                mod.weight.copy_(torch.randn(mod.weight.shape, generator=g) / fan_in**0.5)
            elif name.endswith("to_out.0") or leaf in _OUT or (
                "single" in name and leaf in ("proj_out", "linear2")
            ):
                mod.weight.copy_(torch.randn(mod.weight.shape, generator=g) * (3 / fan_in**0.5))


def _unzero(model: nn.Module) -> None:
    """Re-initialise linears that a model zero-initialises (adaLN-zero modulation, gates, final projections):
    with all-zero gates a random-weight model ignores its attention entirely."""
    g = torch.Generator().manual_seed(4321)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, nn.Linear) and not mod.weight.any():
                mod.weight.copy_(torch.randn(mod.weight.shape, generator=g) / mod.in_features**0.5)


def _boost(model: nn.Module, leaf_suffix: str, factor: float) -> None:
    """Scale the linears whose name ends with ``leaf_suffix`` (adaLN modulations fed by a small timestep
    embedding give gates ~1e-2 in a random tiny model, so attention hardly moves the output)."""
    with torch.no_grad():
        for name, mod in model.named_modules():
            if isinstance(mod, nn.Linear) and name.endswith(leaf_suffix):
                mod.weight.mul_(factor)


def build(name: str, batch: int = 1, seed: int = 0):
    torch.manual_seed(seed)
    model, make_inputs = globals()[name](batch)
    _unzero(model)
    _spread_attention(model, extra_qk=META[name].attention_names)
    model.eval()
    return model, make_inputs


# =====================================================================================================
# Families
# =====================================================================================================


@family(Meta(
    cls="ChromaTransformer2DModel", pipeline="chroma/pipeline_chroma.py", convert="t",
    cfg="two_calls",
    notes="timestep / 1000; attention_mask = cat([text mask (one pad token past the prompt kept), ones(image)]) "
          "in the text encoder's float dtype; each block turns it into m[:,None,None,:] * m[:,None,:,None] "
          "([B,1,S,S], a float 0/1 mask, i.e. additive)",
))
def chroma(batch: int = 1):
    from diffusers import ChromaTransformer2DModel

    m = ChromaTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=(4, 6, 6), approximator_num_channels=8,
        approximator_hidden_dim=16, approximator_layers=1,
    )
    s_img, s_txt = 16, 8

    def make_inputs(seed: int = 0, t: Optional[float] = None):
        g = torch.Generator().manual_seed(seed)
        ids = torch.zeros(s_img, 3)
        ids[:, 1] = torch.arange(s_img) // 4
        ids[:, 2] = torch.arange(s_img) % 4
        txt_mask = _pad_mask(batch, s_txt, keep=5, dtype=torch.float32)
        for i in range(batch):  # Chroma keeps one pad token past the prompt (mask_indices <= seq_lengths)
            txt_mask[i, int(txt_mask[i].sum())] = 1
        mask = torch.cat([txt_mask, torch.ones(batch, s_img, dtype=torch.bool)], dim=1)
        return dict(
            hidden_states=torch.randn(batch, s_img, 16, generator=g),
            encoder_hidden_states=torch.randn(batch, s_txt, 32, generator=g),
            timestep=_tvec(_t(seed, t), batch),
            img_ids=ids, txt_ids=torch.zeros(s_txt, 3), attention_mask=mask, return_dict=False,
        )

    return m, make_inputs


@family(Meta(
    cls="MochiTransformer3DModel", pipeline="mochi/pipeline_mochi.py", convert="1000*(1-t)",
    direction="increasing", cfg="batch",
    notes="scheduler config invert_sigmas=True: the transformer sees t = 1000 * (1 - sigma), rising 0 -> ~1000 "
          "(pipeline: 'Mochi uses reversed timesteps'); CFG batched [uncond, cond]; encoder_attention_mask "
          "from the tokenizer (padded)",
))
def mochi(batch: int = 1):
    from diffusers import MochiTransformer3DModel

    m = MochiTransformer3DModel(
        patch_size=2, num_attention_heads=2, attention_head_dim=16, num_layers=1, pooled_projection_dim=16,
        in_channels=4, qk_norm="rms_norm", text_embed_dim=16, time_embed_dim=4, activation_fn="swiglu",
        max_sequence_length=8,
    )

    make_inputs = _inputs(batch, lambda t: 1000 * (1 - t), hidden_states=(4, 2, 8, 8), encoder_hidden_states=(8, 16),
                          encoder_attention_mask=lambda g: _pad_mask(batch, 8, dtype=torch.bool))
    return m, make_inputs


@family(Meta(
    cls="Lumina2Transformer2DModel", pipeline="lumina2/pipeline_lumina2.py", convert="1-t",
    direction="increasing", cfg="two_calls",
    notes="current_timestep = 1 - t/1000 (Lumina: t=0 is noise), rising 0 -> 1; CFG as two calls; "
          "num_kv_heads < num_heads (k/v repeated to all heads before SDPA); caption mask .sum().tolist() "
          "in the RoPE embedder (graph break)",
))
def lumina2(batch: int = 1):
    from diffusers import Lumina2Transformer2DModel

    m = Lumina2Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, hidden_size=32, num_layers=1, num_refiner_layers=1,
        num_attention_heads=2, num_kv_heads=1, multiple_of=16, axes_dim_rope=(4, 6, 6), axes_lens=(32, 32, 32),
        cap_feat_dim=16,
    )

    make_inputs = _inputs(batch, _RISING, hidden_states=(4, 8, 8), encoder_hidden_states=(8, 16),
                          encoder_attention_mask=lambda g: _pad_mask(batch, 8, dtype=torch.bool))
    return m, make_inputs


@family(Meta(
    cls="LuminaNextDiT2DModel", pipeline="lumina/pipeline_lumina.py", convert="1-t", direction="increasing",
    cfg="batch",
    notes="current_timestep = 1 - t/1000 (rising); image_rotary_emb = get_2d_rotary_pos_embed_lumina(head_dim, 384, "
          "384) (a complex table the pipeline recomputes each step); encoder_mask from the tokenizer",
))
def lumina_next(batch: int = 1):
    from diffusers import LuminaNextDiT2DModel
    from diffusers.models.embeddings import get_2d_rotary_pos_embed_lumina

    m = LuminaNextDiT2DModel(
        sample_size=8, patch_size=2, in_channels=4, hidden_size=32, num_layers=1, num_attention_heads=2,
        num_kv_heads=1, multiple_of=16, learn_sigma=True, qk_norm=True, cross_attention_dim=16,
    )
    rope = get_2d_rotary_pos_embed_lumina(16, 384, 384)

    make_inputs = _inputs(batch, _RISING, hidden_states=(4, 8, 8), encoder_hidden_states=(8, 16),
                          encoder_mask=lambda g: _pad_mask(batch, 8), image_rotary_emb=rope,
                          # proportional_attn: (default_image_size // 16) ** 2
                          cross_attention_kwargs={"base_sequence_length": 16})
    return m, make_inputs


@family(Meta(
    cls="SanaTransformer2DModel", pipeline="sana/pipeline_sana.py", convert="1000*t", cfg="batch",
    notes="timestep = t * config.timestep_scale (1.0); self-attention is linear attention (no SDPA); "
          "cross-attention with the tokenizer mask (padded to max_length)",
))
def sana(batch: int = 1):
    from diffusers import SanaTransformer2DModel

    m = SanaTransformer2DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=1,
        num_cross_attention_heads=2, cross_attention_head_dim=16, cross_attention_dim=32, caption_channels=16,
        sample_size=8, patch_size=1,
    )

    make_inputs = _inputs(batch, _SCALED, hidden_states=(4, 8, 8), encoder_hidden_states=(8, 16),
                          encoder_attention_mask=lambda g: _pad_mask(batch, 8))
    return m, make_inputs


@family(Meta(
    cls="SanaVideoTransformer3DModel", pipeline="sana_video/pipeline_sana_video.py", convert="1000*t",
    cfg="batch",
    notes="as Sana: linear self-attention, SDPA cross-attention with the padded text mask",
))
def sana_video(batch: int = 1):
    from diffusers import SanaVideoTransformer3DModel

    m = SanaVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=1,
        num_cross_attention_heads=2, cross_attention_head_dim=16, cross_attention_dim=32, caption_channels=16,
        sample_size=8, patch_size=(1, 2, 2), rope_max_seq_len=32,
    )

    make_inputs = _inputs(batch, _SCALED, hidden_states=(4, 2, 8, 8), encoder_hidden_states=(8, 16),
                          encoder_attention_mask=lambda g: _pad_mask(batch, 8))
    return m, make_inputs


@family(Meta(
    cls="AuraFlowTransformer2DModel", pipeline="aura_flow/pipeline_aura_flow.py", convert="t", cfg="batch",
    notes="timestep = t / 1000; no text mask (256 max-length T5 tokens)",
))
def auraflow(batch: int = 1):
    from diffusers import AuraFlowTransformer2DModel

    # 64 image tokens: not the 16 tokens of the prompt with its 8 register tokens, so lengths tell them apart
    m = AuraFlowTransformer2DModel(
        sample_size=16, patch_size=2, in_channels=4, num_mmdit_layers=1, num_single_dit_layers=1,
        attention_head_dim=16, num_attention_heads=2, caption_projection_dim=32, joint_attention_dim=16,
        out_channels=4, pos_embed_max_size=64,
    )
    _boost(m, "norm1.linear", 30.0)
    _boost(m, "norm1_context.linear", 30.0)

    make_inputs = _inputs(batch, _RAW, hidden_states=(4, 16, 16), encoder_hidden_states=(8, 16))
    return m, make_inputs


@family(Meta(
    cls="HiDreamImageTransformer2DModel", pipeline="hidream_image/pipeline_hidream_image.py",
    timestep_arg="timesteps", convert="1000*t", cfg="batch",
    notes="argument named `timesteps`; llama3 hidden states of every layer stacked [L, B, S, C]",
))
def hidream(batch: int = 1):
    from diffusers import HiDreamImageTransformer2DModel

    m = HiDreamImageTransformer2DModel(
        patch_size=2, in_channels=4, out_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, caption_channels=[16, 8], text_emb_dim=16, num_routed_experts=2,
        num_activated_experts=2, axes_dims_rope=(8, 4, 4), max_resolution=(16, 16), llama_layers=(0, 1),
        force_inference_output=True,
    )
    _boost(m, "adaLN_modulation.1", 30.0)

    make_inputs = _inputs(batch, _SCALED, arg="timesteps", hidden_states=(4, 8, 8), encoder_hidden_states_t5=(8, 16),
                          encoder_hidden_states_llama3=lambda g: torch.randn(2, batch, 8, 8, generator=g),
                          pooled_embeds=(16,))
    return m, make_inputs


@family(Meta(
    cls="HunyuanDiT2DModel", pipeline="hunyuandit/pipeline_hunyuandit.py", convert="int(1000*t) as float",
    cfg="batch", dtype="float",
    notes="DDPM timesteps 999..0 passed as float t_expand (positional); CLIP (77) and T5 (256) masks; "
          "image_rotary_emb = get_2d_rotary_pos_embed(head_dim, crops, grid) (cos, sin)",
))
def hunyuandit(batch: int = 1):
    from diffusers import HunyuanDiT2DModel
    from diffusers.models.embeddings import get_2d_rotary_pos_embed

    m = HunyuanDiT2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=2,
        cross_attention_dim=16, cross_attention_dim_t5=16, pooled_projection_dim=8, hidden_size=32, text_len=8,
        text_len_t5=8, activation_fn="gelu-approximate",
    )
    rope = get_2d_rotary_pos_embed(16, ((0, 0), (4, 4)), (4, 4), output_type="pt")

    make_inputs = _inputs(
        batch, lambda t: float(int(999 * t)), hidden_states=(4, 8, 8), encoder_hidden_states=(8, 16),
        text_embedding_mask=lambda g: _pad_mask(batch, 8), encoder_hidden_states_t5=(8, 16),
        text_embedding_mask_t5=lambda g: _pad_mask(batch, 8, keep=5),
        image_meta_size=torch.tensor([[64, 64, 64, 64, 0, 0]] * batch, dtype=torch.float32),
        style=torch.zeros(batch, dtype=torch.long), image_rotary_emb=rope)
    return m, make_inputs


@family(Meta(
    cls="AllegroTransformer3DModel", pipeline="allegro/pipeline_allegro.py", convert="1000*t", cfg="batch",
    notes="EulerAncestral timesteps (float, 999..0); image_rotary_emb = ((freqs_t, freqs_h, freqs_w), "
          "(grid_t, grid_h, grid_w)) from get_3d_rotary_pos_embed_allegro; text mask from the tokenizer",
))
def allegro(batch: int = 1):
    from diffusers import AllegroTransformer3DModel
    from diffusers.models.embeddings import get_3d_rotary_pos_embed_allegro

    m = AllegroTransformer3DModel(
        num_attention_heads=2, attention_head_dim=24, in_channels=4, out_channels=4, num_layers=1,
        cross_attention_dim=48, sample_width=8, sample_height=8, sample_frames=8, caption_channels=16,
    )  # head dim 24: the 3-D RoPE splits it in three even parts
    ft, fh, fw, gt, gh, gw = get_3d_rotary_pos_embed_allegro(
        embed_dim=24, crops_coords=((0, 0), (4, 4)), grid_size=(4, 4), temporal_size=2,
        interpolation_scale=(2.2, 2.0, 2.0))
    pos = torch.cartesian_prod(gt.long(), gh.long(), gw.long()).reshape(-1, 3).transpose(0, 1).reshape(3, 1, -1)
    rope = ((ft, fh, fw), tuple(pos.contiguous()))

    make_inputs = _inputs(batch, _SCALED, hidden_states=(4, 2, 8, 8), encoder_hidden_states=(8, 16),
                          encoder_attention_mask=lambda g: _pad_mask(batch, 8), image_rotary_emb=rope)
    return m, make_inputs


@family(Meta(
    cls="LTX2VideoTransformer3DModel", pipeline="ltx2/pipeline_ltx2.py", convert="1000*t", cfg="batch",
    notes="audio+video: two token streams with self/cross attention each plus audio<->video cross-attention; "
          "timestep also passed as sigma; connector mask (binary, padded); video/audio coords from the rope helpers",
))
def ltx2(batch: int = 1):
    from diffusers import LTX2VideoTransformer3DModel

    m = LTX2VideoTransformer3DModel(
        in_channels=4, out_channels=4, patch_size=1, patch_size_t=1, num_attention_heads=2, attention_head_dim=16,
        cross_attention_dim=32, audio_in_channels=4, audio_out_channels=4, audio_num_attention_heads=2,
        audio_attention_head_dim=16, audio_cross_attention_dim=32, num_layers=1, qk_norm="rms_norm_across_heads",
        caption_channels=16, rope_double_precision=False,
    )

    def make_inputs(seed: int = 0, t: Optional[float] = None):
        g = torch.Generator().manual_seed(seed)
        ts = _tvec(1000 * _t(seed, t), batch)
        return dict(
            hidden_states=torch.randn(batch, 2 * 4 * 4, 4, generator=g),
            audio_hidden_states=torch.randn(batch, 9, 4, generator=g),
            encoder_hidden_states=torch.randn(batch, 8, 16, generator=g),
            audio_encoder_hidden_states=torch.randn(batch, 8, 16, generator=g),
            timestep=ts, sigma=ts,
            encoder_attention_mask=_pad_mask(batch, 8), audio_encoder_attention_mask=_pad_mask(batch, 8),
            num_frames=2, height=4, width=4, fps=24.0, audio_num_frames=9, return_dict=False,
        )

    return m, make_inputs


@family(Meta(
    cls="CogView3PlusTransformer2DModel", pipeline="cogview3/pipeline_cogview3plus.py", convert="int(1000*t)",
    dtype="long", cfg="batch",
    notes="CogVideoXDDIM timesteps (int64, 999..0); original/target size and crop coords",
))
def cogview3plus(batch: int = 1):
    from diffusers import CogView3PlusTransformer2DModel

    m = CogView3PlusTransformer2DModel(
        patch_size=2, in_channels=4, num_layers=1, attention_head_dim=16, num_attention_heads=2, out_channels=4,
        text_embed_dim=16, time_embed_dim=8, condition_dim=2, pos_embed_max_size=8, sample_size=8,
    )

    make_inputs = _inputs(batch, _DDIM, dtype=torch.long, hidden_states=(4, 8, 8), encoder_hidden_states=(8, 16),
                          original_size=torch.tensor([[64, 64]] * batch), target_size=torch.tensor([[64, 64]] * batch),
                          crop_coords=torch.tensor([[0, 0]] * batch))
    return m, make_inputs


@family(Meta(
    cls="CogView4Transformer2DModel", pipeline="cogview4/pipeline_cogview4.py", convert="1000*t", cfg="two_calls",
    notes="GLM text padded (left, no mask) to a multiple of 16: prompt and negative prompt differ in length "
          "(here 32 vs 16 tokens), so the two CFG calls have different shapes",
))
def cogview4(batch: int = 1):
    from diffusers import CogView4Transformer2DModel

    m = CogView4Transformer2DModel(
        patch_size=2, in_channels=4, num_layers=1, attention_head_dim=16, num_attention_heads=2, out_channels=4,
        text_embed_dim=16, time_embed_dim=8, condition_dim=4,
    )

    make_inputs = _inputs(batch, _SCALED, negative=dict(encoder_hidden_states=(16, 16)), hidden_states=(4, 8, 8),
                          encoder_hidden_states=(32, 16), original_size=torch.tensor([[64.0, 64.0]] * batch),
                          target_size=torch.tensor([[64.0, 64.0]] * batch), crop_coords=torch.tensor([[0.0, 0.0]] * batch))
    return m, make_inputs


def _torchvision_resize_shim(module) -> None:
    """``transformer_cosmos`` resizes its padding mask with torchvision (imported only if installed); the test venv
    has no torchvision, so give the module the one call it makes (nearest resize == F.interpolate nearest)."""
    if hasattr(module, "transforms"):
        return
    import types

    def resize(x, size, interpolation=None):
        return torch.nn.functional.interpolate(x, size=list(size), mode="nearest")

    module.transforms = types.SimpleNamespace(
        functional=types.SimpleNamespace(resize=resize), InterpolationMode=types.SimpleNamespace(NEAREST="nearest"))


@family(Meta(
    cls="CosmosTransformer3DModel", pipeline="cosmos/pipeline_cosmos2_text2image.py",
    convert="t (sigma/(sigma+1))", cfg="two_calls",
    notes="Cosmos-Predict2: timestep = sigma / (sigma + 1) in (0, 1), falling; padding_mask zeros(1,1,H,W); "
          "no text mask",
))
def cosmos(batch: int = 1):
    from diffusers import CosmosTransformer3DModel
    from diffusers.models.transformers import transformer_cosmos

    _torchvision_resize_shim(transformer_cosmos)

    m = CosmosTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=1, mlp_ratio=2,
        text_embed_dim=16, adaln_lora_dim=4, max_size=(4, 16, 16), patch_size=(1, 2, 2), rope_scale=(1.0, 4.0, 4.0),
        concat_padding_mask=True, extra_pos_embed_type=None,
    )

    make_inputs = _inputs(batch, _RAW, hidden_states=(4, 1, 8, 8), encoder_hidden_states=(8, 16),
                          padding_mask=torch.zeros(1, 1, 8, 8))
    return m, make_inputs


@family(Meta(
    cls="EasyAnimateTransformer3DModel", pipeline="easyanimate/pipeline_easyanimate.py", convert="1000*t",
    cfg="batch", notes="t_expand (float) passed positionally; the text mask is not passed to the transformer",
))
def easyanimate(batch: int = 1):
    from diffusers import EasyAnimateTransformer3DModel

    m = EasyAnimateTransformer3DModel(
        attention_head_dim=16, num_attention_heads=2, in_channels=4, mmdit_layers=1, num_layers=1, out_channels=4,
        patch_size=2, sample_height=8, sample_width=8, text_embed_dim=16, time_embed_dim=8,
        time_position_encoding_type="3d_rope", timestep_activation_fn="silu",
    )

    make_inputs = _inputs(batch, _SCALED, hidden_states=(4, 2, 8, 8), encoder_hidden_states=(8, 16))
    return m, make_inputs


def _wan_like(cls, batch, inputs=None, **kw):
    """A Wan-style model (``cls`` with ``kw`` over the tiny defaults) and its inputs, ``inputs`` (``_inputs``
    entries) added to or replacing the latents and the text."""
    import diffusers

    args = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
                text_dim=16, freq_dim=16, ffn_dim=32, num_layers=1, rope_max_seq_len=32)
    args.update(kw)
    m = getattr(diffusers, cls)(**args)
    spec = {"hidden_states": (args["in_channels"], 2, 8, 8), "encoder_hidden_states": (8, 16), **(inputs or {})}
    return m, _inputs(batch, _SCALED, **spec)


@family(Meta(
    cls="SkyReelsV2Transformer3DModel", pipeline="skyreels_v2/pipeline_skyreels_v2.py", convert="1000*t",
    cfg="two_calls", notes="Wan-style; text padded to 512 with zeros (no mask)",
))
def skyreels_v2(batch: int = 1):
    return _wan_like("SkyReelsV2Transformer3DModel", batch)


@family(Meta(
    cls="WanVACETransformer3DModel", pipeline="wan/pipeline_wan_vace.py", convert="1000*t", cfg="two_calls",
    notes="Wan + VACE control blocks (control_hidden_states, per-layer conditioning scale tensor)",
))
def wan_vace(batch: int = 1):
    return _wan_like("WanVACETransformer3DModel", batch, vace_layers=[0], vace_in_channels=12,
                     inputs=dict(control_hidden_states=(12, 2, 8, 8), control_hidden_states_scale=torch.ones(1)))


@family(Meta(
    cls="ChronoEditTransformer3DModel", pipeline="chronoedit/pipeline_chronoedit.py", convert="1000*t",
    cfg="two_calls", notes="Wan-2.1-I2V-style: latents concatenated with the condition on channels, CLIP image "
                           "embeds as extra cross-attention keys (added_kv_proj_dim); text padded to exactly 512 "
                           "tokens (the processor splits image/text context at len - 512)",
))
def chronoedit(batch: int = 1):
    # the I2V cross-attention splits the context as [image tokens | 512 text tokens] (text length hard-coded)
    return _wan_like("ChronoEditTransformer3DModel", batch, in_channels=8, image_dim=16, added_kv_proj_dim=32,
                     inputs=dict(encoder_hidden_states=(512, 16), encoder_hidden_states_image=(4, 16)))


@family(Meta(
    cls="QwenImageTransformer2DModel", pipeline="qwenimage/pipeline_qwenimage.py", convert="t", cfg="two_calls",
    notes="timestep / 1000; true CFG as two calls; text padded to the longest prompt of the call and the mask "
          "dropped when all-true, so cond and uncond calls have different text lengths (here 8 vs 5); img_shapes list",
))
def qwenimage(batch: int = 1):
    from diffusers import QwenImageTransformer2DModel

    m = QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=16, guidance_embeds=False, axes_dims_rope=(8, 4, 4),
    )

    def make_inputs(seed: int = 0, t: Optional[float] = None, neg: bool = False):
        g = torch.Generator().manual_seed(seed)
        s_txt = 5 if neg else 8
        mask = _pad_mask(batch, s_txt, keep=s_txt - 2, dtype=torch.long) if batch > 1 else None
        return dict(
            hidden_states=torch.randn(batch, 16, 16, generator=g),
            encoder_hidden_states=torch.randn(batch, s_txt, 16, generator=g),
            encoder_hidden_states_mask=mask,
            timestep=_tvec(_t(seed, t), batch),
            img_shapes=[(1, 4, 4)] * batch, return_dict=False,
        )

    return m, make_inputs


@family(Meta(
    cls="Flux2Transformer2DModel", pipeline="flux2/pipeline_flux2.py", convert="t", cfg="none",
    notes="timestep / 1000; guidance-distilled (no CFG); 4-axis ids [B, S, 4]",
))
def flux2(batch: int = 1):
    from diffusers import Flux2Transformer2DModel

    m = Flux2Transformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, timestep_guidance_channels=256, axes_dims_rope=[4, 4, 4, 4],
    )

    img_ids = torch.cartesian_prod(torch.arange(1), torch.arange(4), torch.arange(4), torch.arange(1))
    txt_ids = torch.cartesian_prod(torch.arange(1), torch.arange(1), torch.arange(1), torch.arange(8))
    make_inputs = _inputs(batch, _RAW, hidden_states=(16, 4), encoder_hidden_states=(8, 32),
                          img_ids=img_ids.unsqueeze(0).expand(batch, -1, -1),
                          txt_ids=txt_ids.unsqueeze(0).expand(batch, -1, -1), guidance=_tvec(4.0, batch))
    return m, make_inputs


@family(Meta(
    cls="OmniGenTransformer2DModel", pipeline="omnigen/pipeline_omnigen.py", convert="1-t", direction="increasing",
    cfg="batch",
    notes="scheduler FlowMatchEuler(invert_sigmas=True, num_train_timesteps=1): timestep = 1 - sigma, rising "
          "0 -> 1; one sequence [text (left-padded) | time token | image]; OmniGenCollator's mask [B, S, S] is causal "
          "over text, bidirectional over the image, with pad columns zero (-> additive min-float mask)",
))
def omnigen(batch: int = 1):
    from diffusers import OmniGenTransformer2DModel
    from diffusers.pipelines.omnigen.processor_omnigen import OmniGenCollator

    m = OmniGenTransformer2DModel(
        in_channels=4, patch_size=2, hidden_size=32, num_attention_heads=2, num_key_value_heads=2,
        intermediate_size=64, num_layers=1, pad_token_id=0, vocab_size=100, time_step_dim=16,
        rope_scaling={"long_factor": [1.0] * 8, "short_factor": [1.0] * 8}, pos_embed_max_size=16,
    )
    coll = OmniGenCollator(pad_token_id=0, hidden_size=32)

    def make_inputs(seed: int = 0, t: Optional[float] = None):
        g = torch.Generator().manual_seed(seed)
        # batch items alternate cond (6 text tokens) / uncond (3 tokens), as the pipeline's CFG batch
        ids = [torch.randint(1, 100, (6 if i % 2 == 0 else 3,), generator=g).tolist() for i in range(batch)]
        mllm = [{"input_ids": x, "pixel_values": None, "image_sizes": None} for x in ids]
        input_ids, position_ids, mask, _, _, sizes = coll.process_mllm_input(mllm, [[64, 64]] * batch)
        return dict(
            hidden_states=torch.randn(batch, 4, 8, 8, generator=g),
            timestep=_tvec(1 - _t(seed, t), batch),
            input_ids=input_ids, input_img_latents=[], input_image_sizes=sizes,
            attention_mask=mask, position_ids=position_ids, return_dict=False,
        )

    return m, make_inputs


@family(Meta(
    cls="StableAudioDiTModel", pipeline="stable_audio/pipeline_stable_audio.py", convert="t (atan(sigma)*2/pi)",
    cfg="batch",
    notes="CosineDPMSolver: timestep = atan(sigma) / (pi/2) in (0, 1), falling, passed as t.unsqueeze(0) (shape [1] "
          "for a CFG batch of 2); GQA (kv heads < heads, repeated before SDPA); rotary (cos, sin) of half the head dim",
))
def stable_audio(batch: int = 1):
    from diffusers import StableAudioDiTModel
    from diffusers.models.embeddings import get_1d_rotary_pos_embed

    m = StableAudioDiTModel(
        sample_size=16, in_channels=4, num_layers=1, attention_head_dim=16, num_attention_heads=2,
        num_key_value_attention_heads=1, out_channels=4, cross_attention_dim=16, time_proj_dim=8,
        global_states_input_dim=16, cross_attention_input_dim=16,
    )
    rope = get_1d_rotary_pos_embed(8, 16 + 1, use_real=True, repeat_interleave_real=False)

    def make_inputs(seed: int = 0, t: Optional[float] = None):
        g = torch.Generator().manual_seed(seed)
        return dict(
            hidden_states=torch.randn(batch, 4, 16, generator=g),
            timestep=torch.tensor([_t(seed, t)]),
            encoder_hidden_states=torch.randn(batch, 8, 16, generator=g),
            global_hidden_states=torch.randn(batch, 1, 16, generator=g),
            rotary_embedding=rope, return_dict=False,
        )

    return m, make_inputs


@family(Meta(
    cls="LatteTransformer3DModel", pipeline="latte/pipeline_latte.py", convert="int(1000*t)", dtype="long",
    cfg="batch", notes="DDIM int64 timesteps; spatial blocks (per frame, batch*frames) and temporal blocks "
                       "(per pixel, batch*pixels, F tokens); cross-attention to the text without a mask",
))
def latte(batch: int = 1):
    from diffusers import LatteTransformer3DModel

    m = LatteTransformer3DModel(
        sample_size=8, num_layers=1, patch_size=2, attention_head_dim=16, num_attention_heads=2, caption_channels=16,
        in_channels=4, cross_attention_dim=32, out_channels=8, attention_bias=True, activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000, norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6,
        video_length=2,
    )

    make_inputs = _inputs(batch, _DDIM, dtype=torch.long, hidden_states=(4, 2, 8, 8), encoder_hidden_states=(8, 16),
                          enable_temporal_attentions=True)
    return m, make_inputs


@family(Meta(
    cls="ConsisIDTransformer3DModel", pipeline="consisid/pipeline_consisid.py", convert="int(1000*t)", dtype="long",
    cfg="batch", notes="CogVideoX-based (LFE_output_dim must equal int(inner_dim * 2 / 3)), image latents concatenated on channels; face ID features (id_vit_hidden, "
                       "id_cond) go through a perceiver and face cross-attention blocks every cross_attn_interval",
))
def consisid(batch: int = 1):
    from diffusers import ConsisIDTransformer3DModel

    m = ConsisIDTransformer3DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=8, out_channels=4, time_embed_dim=4,
        text_embed_dim=16, num_layers=1, sample_width=8, sample_height=8, sample_frames=1, patch_size=2,
        temporal_compression_ratio=4, max_text_seq_length=8, cross_attn_interval=1, is_kps=False, is_train_face=True,
        cross_attn_dim_head=16, cross_attn_num_heads=2, LFE_id_dim=2, LFE_vit_dim=2, LFE_depth=5, LFE_dim_head=16,
        LFE_num_heads=2, LFE_num_id_token=1, LFE_num_querie=1, LFE_output_dim=21, LFE_ff_mult=1, LFE_num_scale=1,
    )

    make_inputs = _inputs(batch, _DDIM, dtype=torch.long, hidden_states=(1, 8, 8, 8), encoder_hidden_states=(8, 16),
                          id_vit_hidden=lambda g: [torch.randn(batch, 2, 2, generator=g)], id_cond=(2,))
    return m, make_inputs


@family(Meta(
    cls="HunyuanVideoFramepackTransformer3DModel", pipeline="hunyuan_video/pipeline_hunyuan_video_framepack.py",
    convert="1000*t", cfg="none",
    notes="distilled guidance (true_cfg_scale 1 by default: one call per step); clean/history latents at 1x/2x/4x "
          "with their frame indices; image embeds (SigLIP) projected and prepended; text mask as HunyuanVideo",
))
def hunyuan_framepack(batch: int = 1):
    from diffusers import HunyuanVideoFramepackTransformer3DModel

    m = HunyuanVideoFramepackTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=1, num_single_layers=1,
        num_refiner_layers=1, patch_size=2, patch_size_t=1, guidance_embeds=True, text_embed_dim=16,
        pooled_projection_dim=8, rope_axes_dim=(4, 4, 8), image_condition_type=None, has_image_proj=True,
        image_proj_dim=16, has_clean_x_embedder=True,
    )

    def make_inputs(seed: int = 0, t: Optional[float] = None):
        g = torch.Generator().manual_seed(seed)
        f = 2
        return dict(
            hidden_states=torch.randn(batch, 4, f, 8, 8, generator=g),  # 32 tokens: two vision blocks of 16
            timestep=_tvec(1000 * _t(seed, t), batch),
            encoder_hidden_states=torch.randn(batch, 8, 16, generator=g),
            encoder_attention_mask=_pad_mask(batch, 8),
            pooled_projections=torch.randn(batch, 8, generator=g),
            image_embeds=torch.randn(batch, 4, 16, generator=g),
            indices_latents=torch.arange(f),
            guidance=_tvec(10.0 * 1000, batch),
            latents_clean=torch.randn(batch, 4, 1, 8, 8, generator=g), indices_latents_clean=torch.tensor([f]),
            latents_history_2x=torch.randn(batch, 4, 2, 8, 8, generator=g), indices_latents_history_2x=torch.arange(2),
            latents_history_4x=torch.randn(batch, 4, 4, 8, 8, generator=g), indices_latents_history_4x=torch.arange(4),
            return_dict=False,
        )

    return m, make_inputs


@family(Meta(
    cls="HunyuanImageTransformer2DModel", pipeline="hunyuan_image/pipeline_hunyuanimage.py", convert="1000*t",
    cfg="two_calls", notes="guider (AdaptiveProjectedMixGuidance) runs cond and uncond as separate calls; "
                           "text padded to max_length with a mask; timestep_r only for meanflow checkpoints",
))
def hunyuan_image(batch: int = 1):
    from diffusers import HunyuanImageTransformer2DModel

    m = HunyuanImageTransformer2DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=1, num_single_layers=1,
        num_refiner_layers=1, patch_size=(1, 1), text_embed_dim=16, rope_axes_dim=(8, 8),
    )

    make_inputs = _inputs(batch, _SCALED, hidden_states=(4, 4, 4), encoder_hidden_states=(8, 16),
                          encoder_attention_mask=lambda g: _pad_mask(batch, 8))
    return m, make_inputs


@family(Meta(
    cls="HunyuanVideo15Transformer3DModel", pipeline="hunyuan_video1_5/pipeline_hunyuan_video1_5.py",
    convert="1000*t", cfg="two_calls",
    notes="guider runs cond/uncond separately; two text encoders with masks (padded), image embeds (zeros for t2v)",
))
def hunyuan_video15(batch: int = 1):
    from diffusers import HunyuanVideo15Transformer3DModel

    m = HunyuanVideo15Transformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=1,
        num_refiner_layers=1, mlp_ratio=2.0, patch_size=1, patch_size_t=1, text_embed_dim=16, text_embed_2_dim=8,
        image_embed_dim=8, rope_axes_dim=(4, 4, 8), target_size=16, task_type="t2v",
    )

    make_inputs = _inputs(batch, _SCALED, hidden_states=(4, 1, 4, 4), encoder_hidden_states=(8, 16),
                          encoder_hidden_states_2=(4, 8), encoder_attention_mask=lambda g: _pad_mask(batch, 8),
                          encoder_attention_mask_2=lambda g: _pad_mask(batch, 4, keep=3),
                          image_embeds=torch.zeros(batch, 3, 8))
    return m, make_inputs


@family(Meta(
    cls="Kandinsky5Transformer3DModel", pipeline="kandinsky5/pipeline_kandinsky.py", convert="1000*t",
    cfg="two_calls",
    notes="latents channels-last [B, F, H, W, C]; text (Qwen, padding='longest') has its own length per call and "
          "text_rope_pos = arange(max text len): cond and uncond calls differ in shape (here 8 vs 5 tokens)",
))
def kandinsky5(batch: int = 1):
    from diffusers import Kandinsky5Transformer3DModel

    m = Kandinsky5Transformer3DModel(
        in_visual_dim=4, in_text_dim=16, in_text_dim2=8, time_dim=16, out_visual_dim=4, patch_size=(1, 2, 2),
        model_dim=32, ff_dim=64, num_text_blocks=1, num_visual_blocks=1, axes_dims=(4, 4, 8),
    )

    make_inputs = _inputs(batch, _SCALED, negative=dict(encoder_hidden_states=(5, 16), text_rope_pos=torch.arange(5)),
                          hidden_states=(2, 8, 8, 4), encoder_hidden_states=(8, 16), pooled_projections=(8,),
                          visual_rope_pos=[torch.arange(2), torch.arange(4), torch.arange(4)],
                          text_rope_pos=torch.arange(8), scale_factor=(1.0, 1.0, 1.0), sparse_params=None)
    return m, make_inputs


@family(Meta(
    cls="BriaTransformer2DModel", pipeline="bria/pipeline_bria.py", convert="1000*t", cfg="batch",
    notes="FLUX-like, but the pipeline passes the raw 0..1000 timestep (no / 1000) and no pooled projections",
))
def bria(batch: int = 1):
    from diffusers import BriaTransformer2DModel

    m = BriaTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, pooled_projection_dim=None, axes_dims_rope=[0, 8, 8],
    )

    ids = torch.zeros(16, 3)
    ids[:, 1] = torch.arange(16) // 4
    ids[:, 2] = torch.arange(16) % 4
    make_inputs = _inputs(batch, _SCALED, hidden_states=(16, 4), encoder_hidden_states=(8, 32), img_ids=ids,
                          txt_ids=torch.zeros(8, 3))
    return m, make_inputs


@family(Meta(
    cls="PRXTransformer2DModel", pipeline="prx/pipeline_prx.py", convert="t", cfg="batch",
    notes="t_cont = t / 1000; text mask (padded) passed as attention_mask",
))
def prx(batch: int = 1):
    from diffusers import PRXTransformer2DModel

    m = PRXTransformer2DModel(
        in_channels=4, patch_size=2, context_in_dim=16, hidden_size=32, mlp_ratio=2.0, num_heads=2, depth=1,
        axes_dim=[8, 8], theta=10_000,
    )

    make_inputs = _inputs(batch, _RAW, hidden_states=(4, 8, 8), encoder_hidden_states=(8, 16),
                          attention_mask=lambda g: _pad_mask(batch, 8, dtype=torch.bool))
    return m, make_inputs


@family(Meta(
    cls="ZImageTransformer2DModel", pipeline="z_image/pipeline_z_image.py", timestep_arg="t", convert="1-t",
    direction="increasing", cfg="batch",
    notes="argument `t` = (1000 - timestep) / 1000, rising 0 -> 1; inputs are LISTS (x: [C,1,H,W] per item, "
          "cap_feats: the valid text tokens per item, so lengths differ); CFG as a list of 2B items",
))
def z_image(batch: int = 1):
    from diffusers import ZImageTransformer2DModel

    m = ZImageTransformer2DModel(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=32, n_layers=1, n_refiner_layers=1,
        n_heads=2, n_kv_heads=2, qk_norm=True, cap_feat_dim=16, rope_theta=256.0, t_scale=1000.0,
        axes_dims=[8, 4, 4], axes_lens=[64, 32, 32],
    )

    def make_inputs(seed: int = 0, t: Optional[float] = None):
        g = torch.Generator().manual_seed(seed)
        return dict(
            x=[torch.randn(4, 1, 8, 8, generator=g) for _ in range(batch)],
            t=_tvec(1 - _t(seed, t), batch),
            cap_feats=[torch.randn(6 + i % 2, 16, generator=g) for i in range(batch)],
            return_dict=False,
        )

    return m, make_inputs
