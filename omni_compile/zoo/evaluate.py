"""Evaluate the zoo model: captioned sample grid, detector accuracy, CFG checks, attention structure.

    python -m omni_compile.zoo.evaluate [--weights DIR] --out DIR [--num-captions 64] [--steps 28]

Writes into ``--out``: ``samples.png`` (generated, caption + detector verdict under each image),
``truth.png`` (procedural renders of the same captions), ``eval.json`` and ``eval.md``.

* Detector accuracy over ``eval_captions(num_captions)`` (fixed), on the generated images and on the
  procedural ground truth of the same captions (should be 1.0).
* Sampler checks on the first few captions: the same seed gives the same images; ``cfg="separate"``
  (two calls a step) matches ``cfg="batched"`` (one call of 2B) up to float tolerance.
* Attention structure: during sampling, the q/k of every attention layer are captured at a few steps
  (the processor's ``dispatch_attention_fn`` is wrapped) and, per query block, the share of attention
  mass in the top 20 % of key blocks is measured: *exact* (softmax attention summed over key blocks,
  averaged over the block's queries) and *pooled* (``omni_compile.ops.pooled_scores``, the estimate the
  policies read). The same for a random-weight model of the same config (diffusers' default init) on
  the same captions and noise. Uniform attention gives about ``k * block / seq`` (reported).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import time
from typing import List, Optional, Sequence

import torch

from . import data as zdata
from . import detector as zdet
from . import model as zmodel
from . import sampler as zsampler
from omni_compile.bench.figures import caption_grid


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--weights", default=None, help="weights directory (default: the shipped omni_compile/zoo/weights)")
    p.add_argument("--out", required=True)
    p.add_argument("--num-captions", type=int, default=64)
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: config, 28)")
    p.add_argument("--guidance", type=float, default=None, help="CFG scale (default: config)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--batch", type=int, default=64, help="captions per sampler call")
    p.add_argument("--grid", type=int, default=16, help="captions in samples.png")
    p.add_argument("--check-captions", type=int, default=4, help="captions for the determinism / CFG-mode checks")
    p.add_argument("--attn-captions", type=int, default=4, help="captions for the attention report")
    p.add_argument("--attn-steps", default=None, help="comma-separated step indices (default: first, middle, last)")
    p.add_argument("--blocks", default="64,128", help="comma-separated block sizes for the attention report")
    p.add_argument("--top", type=float, default=0.2, help="top fraction of key blocks")
    p.add_argument("--sweep-guidance", default=None,
                   help="comma-separated CFG scales to also score on all captions (default: 1,2,3,4,6 on CUDA, none on CPU)")
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------ attention hook


def _topk_share(block_probs: torch.Tensor, frac: float) -> torch.Tensor:
    """``[..., nK]`` rows summing to 1 -> mean over rows of the mass in the top ``ceil(frac * nK)``."""
    k = max(1, math.ceil(frac * block_probs.shape[-1]))
    return block_probs.topk(k, dim=-1).values.sum(-1).mean()


def exact_block_share(q: torch.Tensor, k: torch.Tensor, block: int, frac: float) -> float:
    """``q, k [B, H, S, D]``: softmax attention summed over key blocks, averaged over each query block's
    rows, top-``frac`` key-block mass averaged over query blocks, heads and batch."""
    B, H, S, D = q.shape
    n = math.ceil(S / block)
    pad = n * block - S
    out = []
    for b in range(B):  # one batch item at a time bounds memory
        p = torch.softmax((q[b].float() @ k[b].float().transpose(-1, -2)) / math.sqrt(D), -1)  # [H, S, S]
        p = torch.nn.functional.pad(p, (0, pad, 0, pad))
        kb = p.view(H, n * block, n, block).sum(-1)  # [H, S', nK]
        qsum = kb.view(H, n, block, n).sum(2)  # [H, nQ, nK]
        rows = torch.full((n,), float(block), device=q.device)
        rows[-1] = S - block * (n - 1)
        out.append(_topk_share(qsum / rows[None, :, None], frac))
    return float(torch.stack(out).mean())


def pooled_block_share(q: torch.Tensor, k: torch.Tensor, block: int, frac: float) -> float:
    from omni_compile.ops import pooled_scores

    scores = pooled_scores(q.contiguous(), k.contiguous(), block, block)
    return float(_topk_share(scores, frac))


def uniform_share(S: int, block: int, frac: float) -> float:
    n = math.ceil(S / block)
    k = max(1, math.ceil(frac * n))
    sizes = sorted([block] * (n - 1) + [S - block * (n - 1)], reverse=True)
    return sum(sizes[:k]) / S


class AttentionRecorder:
    """Wraps diffusers' FLUX ``dispatch_attention_fn`` while active; for the steps in ``steps`` it measures
    each attention layer's q/k (``[B, S, H, D]`` there) and stores one record per (step, layer)."""

    def __init__(self, transformer, steps: Sequence[int], blocks: Sequence[int], frac: float):
        from diffusers.models.transformers import transformer_flux as tf

        self.tf = tf
        self.steps, self.blocks, self.frac = set(steps), list(blocks), frac
        self.step: Optional[int] = None
        self.layer: Optional[str] = None
        self.records: List[dict] = []
        self.handles = []
        for name, mod in transformer.named_modules():
            if isinstance(mod, tf.FluxAttention):
                self.handles.append(mod.register_forward_pre_hook(self._enter(name)))
                self.handles.append(mod.register_forward_hook(self._leave))
        if not self.handles:
            raise RuntimeError("no FluxAttention module found in the transformer")

    def _enter(self, name):
        def hook(module, args):
            self.layer = name
        return hook

    def _leave(self, module, args, output):
        self.layer = None

    def on_step(self, i: int, sigma: float) -> None:
        self.step, self.sigma = i, sigma

    @contextlib.contextmanager
    def active(self):
        original = self.tf.dispatch_attention_fn

        def wrapped(query, key, value, *args, **kwargs):
            if self.step in self.steps and self.layer is not None:
                q, k = query.transpose(1, 2), key.transpose(1, 2)  # [B, H, S, D]
                rec = dict(step=self.step, sigma=round(self.sigma, 4), layer=self.layer, seq=q.shape[2])
                for blk in self.blocks:
                    rec[f"exact_{blk}"] = exact_block_share(q, k, blk, self.frac)
                    rec[f"pooled_{blk}"] = pooled_block_share(q, k, blk, self.frac)
                self.records.append(rec)
            return original(query, key, value, *args, **kwargs)

        self.tf.dispatch_attention_fn = wrapped
        try:
            yield self
        finally:
            self.tf.dispatch_attention_fn = original
            for h in self.handles:
                h.remove()


def attention_report(transformer, text_encoder, config, captions, steps, attn_steps, blocks, frac, guidance, seed):
    rec = AttentionRecorder(transformer, attn_steps, blocks, frac)
    with rec.active():
        zsampler.sample(transformer, text_encoder, captions, config=config, num_inference_steps=steps,
                        guidance_scale=guidance, seed=seed, on_step=rec.on_step)
    summary = {}
    for blk in blocks:
        for kind in ("exact", "pooled"):
            vals = [r[f"{kind}_{blk}"] for r in rec.records]
            summary[f"{kind}_{blk}"] = sum(vals) / len(vals)
    return dict(records=rec.records, mean=summary)


# ---------------------------------------------------------------------------------------------- main


def _sample_all(zoo, captions, args, steps, device, dtype, cfg="batched", guidance=None):
    chunks = []
    for i in range(0, len(captions), args.batch):
        chunks.append(zsampler.sample(zoo.transformer, zoo.text_encoder, captions[i:i + args.batch], config=zoo.config,
                                      num_inference_steps=steps, guidance_scale=args.guidance if guidance is None else guidance,
                                      cfg=cfg,
                                      seed=args.seed + i, device=device, dtype=dtype))
    return torch.cat(chunks)


def _verdict(req, det) -> str:
    s = zdet.score(req, det)
    if s["caption_exact"]:
        return "detector: ok"
    if s["object"] == s["objects"] and s["extra"] == 0:
        return "detector: ok (size off)"
    return f"detector: {s['object']}/{s['objects']} obj, {s['extra']} extra"


def main(argv=None) -> dict:
    args = parse_args(argv)
    t0 = time.time()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    os.makedirs(args.out, exist_ok=True)
    weights = args.weights or zmodel.default_weights_dir()
    zoo = zsampler.load_zoo(weights, device=device, dtype=dtype)
    cfg = zoo.config
    steps = args.steps or cfg["sampler"]["num_inference_steps"]
    guidance = cfg["sampler"]["guidance_scale"] if args.guidance is None else args.guidance
    args.guidance = guidance
    image_size = cfg["data"]["image_size"]
    captions = zdata.eval_captions(args.num_captions)
    requested = [zdata.parse_caption(c) for c in captions]
    print(f"[zoo.evaluate] weights={weights} device={device} dtype={dtype} captions={len(captions)} steps={steps} "
          f"guidance={guidance}", flush=True)

    # ground truth: the detector on procedural renders of the same captions
    truth = zdata.render(zdata.scenes_from_captions(captions), None, image_size)
    acc_truth = zdet.accuracy(requested, truth)

    t = time.time()
    images = _sample_all(zoo, captions, args, steps, device, dtype)
    sample_s = time.time() - t
    acc = zdet.accuracy(requested, images)
    print(f"[zoo.evaluate] sampled {len(captions)} images in {sample_s:.1f}s; detector object accuracy "
          f"{acc['object']:.3f} (truth {acc_truth['object']:.3f})", flush=True)

    n_grid = min(args.grid, len(captions))
    verdicts = [_verdict(requested[i], zdet.detect(images[i])) for i in range(n_grid)]
    caption_grid(images[:n_grid], captions[:n_grid], os.path.join(args.out, "samples.png"), extra_lines=verdicts)
    caption_grid(truth[:n_grid], captions[:n_grid], os.path.join(args.out, "truth.png"))

    # detector accuracy vs CFG scale (cheap on a GPU)
    sweep_arg = args.sweep_guidance if args.sweep_guidance is not None else ("1,2,3,4,6" if device.type == "cuda" else "")
    sweep = {}
    for g in [float(x) for x in sweep_arg.split(",") if x.strip()]:
        imgs = _sample_all(zoo, captions, args, steps, device, dtype, guidance=g)
        sweep[str(g)] = zdet.accuracy(requested, imgs)
        print(f"[zoo.evaluate] guidance {g:g}: object accuracy {sweep[str(g)]['object']:.3f}", flush=True)

    # sampler checks
    nc = min(args.check_captions, len(captions))
    sub = captions[:nc]
    kw = dict(config=cfg, num_inference_steps=steps, guidance_scale=guidance, seed=args.seed, device=device, dtype=dtype)
    a = zsampler.sample(zoo.transformer, zoo.text_encoder, sub, cfg="batched", **kw)
    b = zsampler.sample(zoo.transformer, zoo.text_encoder, sub, cfg="batched", **kw)
    c = zsampler.sample(zoo.transformer, zoo.text_encoder, sub, cfg="separate", **kw)
    checks = dict(captions=nc, repeat_max_abs_diff=float((a - b).abs().max()),
                  separate_vs_batched_max_abs_diff=float((a - c).abs().max()),
                  separate_vs_batched_mean_abs_diff=float((a - c).abs().mean()))

    # attention structure: trained vs random weights of the same config
    blocks = [int(x) for x in args.blocks.split(",")]
    attn_steps = [int(x) for x in args.attn_steps.split(",")] if args.attn_steps else sorted({0, steps // 2, steps - 1})
    acap = captions[: min(args.attn_captions, len(captions))]
    attn = {}
    attn["trained"] = attention_report(zoo.transformer, zoo.text_encoder, cfg, acap, steps, attn_steps, blocks, args.top,
                                       guidance, args.seed)
    torch.manual_seed(args.seed)
    rand_t = zmodel.to_inference(zmodel.build_transformer(cfg["dit"], zero_init=False), device, dtype)
    rand_te = zmodel.to_inference(zmodel.build_text_encoder(cfg["text_encoder"]), device, dtype)
    attn["random"] = attention_report(rand_t, rand_te, cfg, acap, steps, attn_steps, blocks, args.top, guidance, args.seed)
    seq = attn["trained"]["records"][0]["seq"]
    attn["uniform"] = {f"{kind}_{blk}": uniform_share(seq, blk, args.top) for blk in blocks for kind in ("exact", "pooled")}

    result = dict(
        weights=os.path.abspath(weights), device=str(device), dtype=args.dtype, steps=steps, guidance=guidance,
        seed=args.seed, num_captions=len(captions), sample_seconds=round(sample_s, 2),
        detector=acc, detector_truth=acc_truth, guidance_sweep=sweep, checks=checks,
        attention=dict(top_fraction=args.top, blocks=blocks, steps=attn_steps, captions=len(acap), seq=seq,
                       trained=attn["trained"], random=attn["random"], uniform=attn["uniform"]),
        training=cfg.get("training"), wall_seconds=round(time.time() - t0, 1),
    )
    with open(os.path.join(args.out, "eval.json"), "w") as f:
        json.dump(result, f, indent=2)
    with open(os.path.join(args.out, "eval.md"), "w") as f:
        f.write(markdown(result))
    short = dict(
        object_accuracy=round(acc["object"], 4), object_size_accuracy=round(acc["object_size"], 4),
        caption_exact=round(acc["caption_exact"], 4), truth_object_accuracy=round(acc_truth["object"], 4),
        **{f"top{int(args.top * 100)}_{k}_trained": round(v, 3) for k, v in attn["trained"]["mean"].items()},
        **{f"top{int(args.top * 100)}_{k}_random": round(v, 3) for k, v in attn["random"]["mean"].items()},
        guidance_sweep={g: round(d["object"], 3) for g, d in sweep.items()},
        separate_vs_batched=checks["separate_vs_batched_max_abs_diff"], repeat_diff=checks["repeat_max_abs_diff"],
        wall_seconds=result["wall_seconds"], out=args.out,
    )
    print("[zoo.evaluate] summary: " + json.dumps(short), flush=True)
    return result


def markdown(r: dict) -> str:
    a, t = r["detector"], r["detector_truth"]
    lines = [
        "# Zoo model evaluation",
        "",
        f"Weights `{r['weights']}`; {r['num_captions']} fixed captions (`eval_captions`), "
        f"{r['steps']} FlowMatchEuler steps, CFG {r['guidance']}, seed {r['seed']}, {r['device']} {r['dtype']}.",
        "",
        "## Detector accuracy",
        "",
        "| | object (pos+colour+shape) | + size | position | colour | shape | size | caption exact | extra objects / image |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, d in (("generated", a), ("procedural ground truth", t)):
        lines.append(f"| {name} | {d['object']:.3f} | {d['object_size']:.3f} | {d['position']:.3f} | {d['colour']:.3f} | "
                     f"{d['shape']:.3f} | {d['size']:.3f} | {d['caption_exact']:.3f} | {d['extra_per_image']:.3f} |")
    if r.get("guidance_sweep"):
        lines += ["", "Detector accuracy vs CFG scale (same captions, seeds and steps):", "",
                  "| guidance | object | + size | caption exact | extra / image |", "|---|---|---|---|---|"]
        for g, d in r["guidance_sweep"].items():
            lines.append(f"| {g} | {d['object']:.3f} | {d['object_size']:.3f} | {d['caption_exact']:.3f} | {d['extra_per_image']:.3f} |")
    c = r["checks"]
    lines += [
        "",
        f"Sampler checks ({c['captions']} captions): same seed twice, max |diff| = {c['repeat_max_abs_diff']:.2e}; "
        f"two calls per step vs one batched call, max |diff| = {c['separate_vs_batched_max_abs_diff']:.2e} "
        f"(mean {c['separate_vs_batched_mean_abs_diff']:.2e}).",
        "",
        "## Attention structure",
        "",
        f"Share of attention mass in the top {int(r['attention']['top_fraction'] * 100)} % of key blocks, per query "
        f"block, averaged over heads, batch (cond + uncond), {len(r['attention']['steps'])} steps "
        f"{r['attention']['steps']} and every attention layer; joint sequence of {r['attention']['seq']} tokens, "
        f"{r['attention']['captions']} captions. *exact*: softmax attention summed per block; *pooled*: "
        "`omni_compile.ops.pooled_scores` (block-mean q/k).",
        "",
        "| block | exact, trained | exact, random | pooled, trained | pooled, random | uniform |",
        "|---|---|---|---|---|---|",
    ]
    at = r["attention"]
    for blk in at["blocks"]:
        lines.append(f"| {blk} | {at['trained']['mean'][f'exact_{blk}']:.3f} | {at['random']['mean'][f'exact_{blk}']:.3f} | "
                     f"{at['trained']['mean'][f'pooled_{blk}']:.3f} | {at['random']['mean'][f'pooled_{blk}']:.3f} | "
                     f"{at['uniform'][f'exact_{blk}']:.3f} |")
    blk = at["blocks"][0]
    lines += ["", f"Per layer and step (block {blk}, exact / pooled):", "",
              "| layer | step (sigma) | trained | random |", "|---|---|---|---|"]
    for rt, rr in zip(at["trained"]["records"], at["random"]["records"]):
        lines.append(f"| {rt['layer']} | {rt['step']} ({rt['sigma']}) | {rt[f'exact_{blk}']:.3f} / {rt[f'pooled_{blk}']:.3f} | "
                     f"{rr[f'exact_{blk}']:.3f} / {rr[f'pooled_{blk}']:.3f} |")
    tr = r.get("training")
    if tr:
        lines += ["", "## Training", "", "```", json.dumps(tr, indent=1), "```"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
