"""The zoo model (``omni_compile.zoo``): data, detector, model, training step, sampler, shipped weights.

CPU, fast: the model tests use the tiny config (same code paths as the shipped ~9 M-parameter one).
"""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

from omni_compile.policies import Fixed
from omni_compile.zoo import data as zdata
from omni_compile.zoo import detector as zdet
from omni_compile.zoo import model as zmodel

pytest.importorskip("diffusers")

from omni_compile.zoo import evaluate as zeval  # noqa: E402
from omni_compile.zoo import sampler as zsampler  # noqa: E402
from omni_compile.zoo import train as ztrain  # noqa: E402

WEIGHTS = zmodel.default_weights_dir()


# ------------------------------------------------------------------------------------------------ data


def test_dataset_is_deterministic_per_seed():
    a = zdata.ShapesData(seed=3).next_batch(16)
    b = zdata.ShapesData(seed=3).next_batch(16)
    c = zdata.ShapesData(seed=4).next_batch(16)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    assert not torch.equal(a[0], c[0])
    images, tokens, scenes = a
    assert images.shape == (16, 3, 64, 64) and images.min() >= -1 and images.max() <= 1
    assert tokens.shape == (16, zdata.MAX_LEN)
    caps = zdata.eval_captions(64)
    assert caps == zdata.eval_captions(64) and len(set(caps)) == 64 and zdata.eval_captions(4) == caps[:4]
    assert 20 <= sum("," in c for c in caps) <= 44


def test_tokens_equal_tokenized_captions_and_round_trip():
    _, tokens, scenes = zdata.ShapesData(seed=5).next_batch(64)
    captions = zdata.scene_captions(scenes)
    tok = zdata.Tokenizer()
    assert torch.equal(tok(captions), tokens)
    assert [tok.decode(t) for t in tokens] == captions
    assert torch.equal(zdata.scenes_from_captions(captions), scenes)
    assert {len(zdata.parse_caption(c)) for c in captions} == {1, 2}
    assert tok.encode("") == zdata.empty_tokens(1)[0].tolist()
    with pytest.raises(ValueError):
        tok.encode("purple circle top left")
    with pytest.raises(ValueError):
        zdata.parse_caption("large red circle top left, small blue square top left")  # same cell


@pytest.mark.parametrize("image_size", [64, 96])
def test_detector_recovers_procedural_ground_truth(image_size):
    images, _, scenes = zdata.ShapesData(image_size=image_size, seed=11).next_batch(300)
    acc = zdet.accuracy(zdata.scene_objects(scenes), (images + 1) / 2)
    assert acc["caption_exact"] == 1.0 and acc["object_size"] == 1.0 and acc["extra_per_image"] == 0.0, acc


def test_detector_tolerates_mild_noise_and_rejects_empty_images():
    images, _, scenes = zdata.ShapesData(seed=12).next_batch(100)
    noisy = ((images + 1) / 2 + 0.08 * torch.randn(images.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    acc = zdet.accuracy(zdata.scene_objects(scenes), noisy)
    assert acc["object"] >= 0.98, acc
    assert zdet.detect(torch.zeros(3, 64, 64)) == []


# ----------------------------------------------------------------------------------------------- model


def _tiny(seed=0, zero_init=True):
    torch.manual_seed(seed)
    cfg = zmodel.default_config(tiny=True)
    return zmodel.build_transformer(cfg["dit"], zero_init=zero_init), zmodel.build_text_encoder(cfg["text_encoder"]), cfg


def test_pack_unpack_and_ids():
    x = torch.randn(2, 3, 64, 64)
    p = zmodel.pack(x)
    assert p.shape == (2, 1024, 12)
    assert torch.equal(zmodel.unpack(p, 64), x)
    ids = zmodel.image_ids(64)
    assert ids.shape == (1024, 3) and ids[33].tolist() == [0, 1, 1]


def test_full_config_fits_the_budget():
    cfg = zmodel.default_config()
    n = (zmodel.count_parameters(zmodel.build_transformer(cfg["dit"]))
         + zmodel.count_parameters(zmodel.build_text_encoder(cfg["text_encoder"])))
    assert 5e6 < n and 2 * n < 25e6  # fp16 storage
    assert cfg["dit"]["attention_head_dim"] in (64, 128)
    assert sum(cfg["dit"]["axes_dims_rope"]) == cfg["dit"]["attention_head_dim"]


def test_training_steps_reduce_loss_on_a_fixed_batch():
    transformer, text_encoder, _ = _tiny()
    x0, tokens, _ = zdata.ShapesData(image_size=32, seed=1).next_batch(4)  # 256 tokens: fast on CPU
    img_ids, txt_ids = zmodel.image_ids(32), zmodel.text_ids(zdata.MAX_LEN)
    params = list(transformer.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=3e-3)

    def loss():
        return ztrain.loss_on(transformer, text_encoder, x0, tokens, torch.Generator().manual_seed(0), img_ids, txt_ids, None)

    first = float(loss().detach())
    for _ in range(8):
        opt.zero_grad()
        loss().backward()
        opt.step()
    assert float(loss().detach()) < 0.8 * first


def test_train_cli_end_to_end(tmp_path):
    out = tmp_path / "zoo"
    summary = ztrain.main(["--out", str(out), "--steps", "3", "--tiny", "--device", "cpu", "--log-every", "1", "--val-size", "2",
                           "--image-size", "32"])
    assert summary["steps"] == 3
    for name in ("dit.safetensors", "text_encoder.safetensors", "config.json", "loss.csv", "loss.png"):
        assert (out / name).exists(), name
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["training"]["steps"] == 3 and cfg["sampler"]["num_inference_steps"] >= 28
    zoo = zsampler.load_zoo(str(out))
    img = zsampler.sample(zoo.transformer, zoo.text_encoder, ["small red circle top left"], config=zoo.config,
                          num_inference_steps=2)
    assert img.shape == (1, 3, 32, 32) and torch.isfinite(img).all()


# --------------------------------------------------------------------------------------------- sampler


class _Oracle(torch.nn.Module):
    """Knows x0: returns the exact flow velocity for any x_t (checks the sampler's conventions)."""

    def __init__(self, x0):
        super().__init__()
        self.x0 = zmodel.pack(x0)
        self.w = torch.nn.Parameter(torch.zeros(1))

    def forward(self, hidden_states, timestep, **kw):
        t = timestep.float()[:, None, None]
        x0 = self.x0.repeat(hidden_states.shape[0] // self.x0.shape[0], 1, 1)
        noise = (hidden_states - (1 - t) * x0) / t
        return (noise - x0,)


@pytest.mark.parametrize("cfg", ["batched", "separate"])
def test_sampler_conventions_with_an_oracle(cfg):
    x0 = zdata.ShapesData(seed=2).next_batch(2)[0]
    _, text_encoder, config = _tiny()
    out = zsampler.sample(_Oracle(x0), text_encoder, ["small red circle top left"] * 2, config=config,
                          num_inference_steps=5, cfg=cfg)
    torch.testing.assert_close(out, (x0 + 1) / 2, atol=1e-5, rtol=0)


def test_sampler_deterministic_and_cfg_modes_agree():
    transformer, text_encoder, config = _tiny(zero_init=False)
    config["data"]["image_size"] = 32  # 256 image tokens: fast on CPU
    transformer.eval()
    text_encoder.eval()
    caps = ["large blue square middle center", "small red triangle top left, large green stripes bottom right"]
    kw = dict(config=config, num_inference_steps=3, guidance_scale=3.0)
    a = zsampler.sample(transformer, text_encoder, caps, seed=7, cfg="batched", **kw)
    b = zsampler.sample(transformer, text_encoder, caps, seed=7, cfg="batched", **kw)
    c = zsampler.sample(transformer, text_encoder, caps, seed=7, cfg="separate", **kw)
    d = zsampler.sample(transformer, text_encoder, caps, seed=8, cfg="batched", **kw)
    assert torch.equal(a, b)
    torch.testing.assert_close(a, c, atol=1e-5, rtol=1e-5)
    assert not torch.equal(a, d)
    # an item's image does not depend on the rest of the batch
    e = zsampler.sample(transformer, text_encoder, caps[1:], seed=8, cfg="batched", **kw)
    torch.testing.assert_close(e[0], zsampler.sample(transformer, text_encoder, caps, seed=7, **kw)[1], atol=1e-5, rtol=1e-5)


def test_attention_share_of_uniform_attention():
    q = torch.zeros(1, 2, 1036, 64)
    k = torch.randn(1, 2, 1036, 64)
    for blk in (64, 128):
        u = zeval.uniform_share(1036, blk, 0.2)
        assert abs(zeval.exact_block_share(q, k, blk, 0.2) - u) < 1e-5
        assert abs(zeval.pooled_block_share(q, k, blk, 0.2) - u) < 1e-5
    k_peaky = torch.zeros(1, 2, 1036, 64)
    k_peaky[:, :, :64] = 8.0
    assert zeval.exact_block_share(torch.ones(1, 2, 1036, 64), k_peaky, 64, 0.2) > 0.99


# ------------------------------------------------------------------------------------- shipped weights


def test_shipped_weights_load_and_sample():
    if not os.path.exists(os.path.join(WEIGHTS, zmodel.DIT_FILE)):
        pytest.skip(f"no shipped weights yet ({WEIGHTS}/{zmodel.DIT_FILE} absent): they are copied there "
                    "(dit.safetensors, text_encoder.safetensors, config.json) after the GPU training run "
                    "`python -m omni_compile.zoo.train --out DIR`")
    size = sum(os.path.getsize(os.path.join(WEIGHTS, f)) for f in (zmodel.DIT_FILE, zmodel.TEXT_FILE))
    assert size <= 25e6
    zoo = zsampler.load_zoo()
    assert zoo.config["dit"] == {**zmodel.DIT_CONFIG, "axes_dims_rope": list(zmodel.DIT_CONFIG["axes_dims_rope"])}
    caps = ["large red circle top left"]
    a = zsampler.sample(zoo.transformer, zoo.text_encoder, caps, config=zoo.config, num_inference_steps=2)
    b = zsampler.sample(zoo.transformer, zoo.text_encoder, caps, config=zoo.config, num_inference_steps=2)
    assert torch.isfinite(a).all() and torch.equal(a, b)


# ----------------------------------------------------------------------------------- runtime quality


def test_ssim_and_psnr_helpers():
    from omni_compile.bench.quality import psnr, ssim

    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    assert ssim(x, x) == pytest.approx(1.0, abs=1e-12) and math.isinf(psnr(x, x, data_range=1.0))
    g = torch.Generator().manual_seed(1)
    prev_s, prev_p = 1.0, math.inf
    for sigma in (0.02, 0.1, 0.3):
        y = (x + sigma * torch.randn(x.shape, generator=g)).clamp(0, 1)
        s, p = ssim(y, x), psnr(y, x, data_range=1.0)
        assert s < prev_s and p < prev_p
        prev_s, prev_p = s, p


def test_zoo_quality_runs_through_the_runtime():
    from omni_compile.bench import quality as zq

    torch.manual_seed(0)
    cfg = zmodel.default_config(tiny=True, image_size=32)  # 256 image + 12 text tokens
    transformer = zmodel.to_inference(zmodel.build_transformer(cfg["dit"], zero_init=False), "cpu", torch.float32)
    text_encoder = zmodel.to_inference(zmodel.build_text_encoder(cfg["text_encoder"]), "cpu", torch.float32)
    zoo = zsampler.Zoo(transformer, text_encoder, cfg, zdata.Tokenizer(cfg["data"]["max_len"]))
    fixed = dict(policy=Fixed(reuse=0.3, skip=0.5), warmup=1, interval=2, taylor_order=1)
    res = zq.run_quality(zdata.eval_captions(1), ["dense", ("fixed", fixed)], steps=3, block=16, zoo=zoo)
    dense, row = res["rows"]
    assert dense["ssim"] == 1.0 and math.isinf(dense["psnr"]) and dense["density"] == 1.0
    assert math.isfinite(row["psnr"]) and math.isfinite(row["ssim"]) and 0 < row["ssim"] <= 1
    assert row["dispatch_steps"] >= 1 and row["dispatch_density"] < 1 and row["density"] < 1
    assert 0 <= row["object_accuracy"] <= 1
    md = zq.markdown(dict(n_captions=1, steps=3, seed=0, cfg="batched", block=16, guidance=4.0, use_inductor=False,
                          device="cpu", dtype="fp32", settings=["dense", "fixed"]), res["rows"])
    assert "Fixed(reuse=0.3, skip=0.5" in md
