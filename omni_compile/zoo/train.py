"""Train the zoo model (rectified flow on the procedural shapes data), time-budgeted.

    python -m omni_compile.zoo.train --out DIR [--minutes 7] [--steps N] [--device cuda]

Writes into ``DIR``: ``dit.safetensors``, ``text_encoder.safetensors``, ``config.json`` (model configs,
data, sampler and training record) as soon as the loop ends, then ``loss.csv`` (written while training)
and ``loss.png``. ``--minutes`` bounds the whole script's wall clock (measured from this module's import;
the loop stops ``--reserve`` seconds before it to save); ``--steps`` bounds the step count; whichever
comes first ends training. The learning rate follows a linear warm-up then a cosine decay over the
*progress* ``max(step / steps, elapsed / budget)``, so a time-bounded run anneals properly whatever the
machine's throughput.

Objective (FLUX / SD3 rectified flow): ``t ~ sigmoid(N(0, 1))`` (logit-normal), ``x_t = (1 - t) x0 + t e``,
the transformer gets ``timestep = t`` and regresses ``v = e - x0`` (MSE). 10 % of captions are replaced
by the empty caption for classifier-free guidance. AdamW, grad-norm clip 1, bf16 autocast on CUDA,
fp32 master weights, an EMA of the weights (the shipped weights are the EMA or the raw ones, whichever
has the lower loss on a fixed validation batch; ``config.json`` records which).
"""

from __future__ import annotations

import time

_T0 = time.time()

import argparse  # noqa: E402
import csv  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from . import data as zdata  # noqa: E402
from . import model as zmodel  # noqa: E402
from omni_compile.bench.figures import plot_loss  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--minutes", type=float, default=7.0, help="wall-clock budget of the whole script (default 7)")
    p.add_argument("--steps", type=int, default=None, help="maximum optimizer steps (default: time only)")
    p.add_argument("--device", default=None, help="cuda | cpu (default: cuda when available)")
    p.add_argument("--batch-size", type=int, default=None, help="default 128 on CUDA, 4 on CPU")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--min-lr-frac", type=float, default=0.05, help="final lr as a fraction of --lr")
    p.add_argument("--warmup", type=int, default=200, help="linear warm-up steps")
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--ema", type=float, default=0.999, help="EMA decay (0 disables)")
    p.add_argument("--caption-dropout", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--dtype", choices=["bf16", "fp32"], default=None, help="autocast dtype (default bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--tiny", action="store_true", help="tiny model config (tests)")
    p.add_argument("--dit-config", default=None, help="JSON object updating the DiT config (experiments)")
    p.add_argument("--text-config", default=None, help="JSON object updating the text encoder config (experiments)")
    p.add_argument("--compile", action="store_true", help="torch.compile the transformer (Inductor); off by default")
    p.add_argument("--log-every", type=int, default=None, help="default 50 on CUDA, 5 on CPU")
    p.add_argument("--reserve", type=float, default=20.0, help="seconds kept at the end of --minutes for saving")
    p.add_argument("--val-size", type=int, default=None, help="validation batch (default 256 on CUDA, 8 on CPU)")
    return p.parse_args(argv)


def lr_at(step: int, progress: float, args) -> float:
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = min(max(progress, 0.0), 1.0)
    floor = args.min_lr_frac
    return args.lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def flow_batch(x0: torch.Tensor, gen: torch.Generator):
    """``(x_t, t, target)`` for a batch of clean images ``x0 [B, C, H, W]``."""
    B = x0.shape[0]
    t = torch.sigmoid(torch.randn(B, generator=gen, device=x0.device))
    noise = torch.randn(x0.shape, generator=gen, device=x0.device)
    tt = t[:, None, None, None]
    return (1 - tt) * x0 + tt * noise, t, noise - x0


def loss_on(transformer, text_encoder, x0, tokens, gen, img_ids, txt_ids, amp_dtype):
    x_t, t, target = flow_batch(x0, gen)
    with torch.autocast(x0.device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        h, pooled = text_encoder(tokens)
        v = zmodel.predict(transformer, zmodel.pack(x_t), t, h, pooled, img_ids, txt_ids)
    return F.mse_loss(v.float(), zmodel.pack(target))


@torch.no_grad()
def validation_loss(transformer, text_encoder, val, img_ids, txt_ids, amp_dtype, seed: int) -> float:
    """Loss on a fixed batch with fixed noise and t (paired comparison of weight sets)."""
    x0, tokens = val
    gen = torch.Generator(device=x0.device).manual_seed(seed)
    total, n = 0.0, 0
    for i in range(0, x0.shape[0], 64):
        loss = loss_on(transformer, text_encoder, x0[i:i + 64], tokens[i:i + 64], gen, img_ids, txt_ids, amp_dtype)
        total += float(loss) * x0[i:i + 64].shape[0]
        n += x0[i:i + 64].shape[0]
    return total / n


def main(argv=None, t0: float | None = None) -> dict:
    """Run training; ``t0``: the wall-clock start that ``--minutes`` counts from (default: now; the
    command line passes this module's import time)."""
    t0 = time.time() if t0 is None else t0
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    bs = args.batch_size or (128 if cuda else 4)
    log_every = args.log_every or (50 if cuda else 5)
    val_size = args.val_size or (256 if cuda else 8)
    amp_dtype = {"bf16": torch.bfloat16, "fp32": None}[args.dtype or ("bf16" if cuda else "fp32")]
    deadline = t0 + args.minutes * 60 - args.reserve
    os.makedirs(args.out, exist_ok=True)
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        # The first H100 run (torch 2.11) died in the first backward with CUBLAS_STATUS_EXECUTION_FAILED
        # (an asynchronous fault from an earlier kernel). cuDNN's SDPA backward is the kernel the passing
        # CPU runs never touch; with it disabled the next run trained cleanly. Cause not isolated further.
        torch.backends.cuda.enable_cudnn_sdp(False)

    config = zmodel.default_config(tiny=args.tiny, image_size=args.image_size)
    config["dit"].update(json.loads(args.dit_config or "{}"))
    config["text_encoder"].update(json.loads(args.text_config or "{}"))
    torch.manual_seed(args.seed)
    transformer = zmodel.build_transformer(config["dit"], zero_init=True).to(device).train()
    text_encoder = zmodel.build_text_encoder(config["text_encoder"]).to(device).train()
    n_dit, n_te = zmodel.count_parameters(transformer), zmodel.count_parameters(text_encoder)
    params = [p for m in (transformer, text_encoder) for p in m.parameters()]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    opt = torch.optim.AdamW(
        [dict(params=decay, weight_decay=args.weight_decay), dict(params=no_decay, weight_decay=0.0)],
        lr=args.lr, betas=(0.9, 0.99), eps=1e-8, **({"fused": True} if cuda else {}),
    )
    ema = [p.detach().clone() for p in params] if args.ema > 0 else None
    fwd = torch.compile(transformer) if args.compile else transformer

    data = zdata.ShapesData(image_size=args.image_size, seed=args.seed, device=device)
    gen = torch.Generator(device=device).manual_seed(args.seed + 1)
    img_ids = zmodel.image_ids(args.image_size, device=device)
    txt_ids = zmodel.text_ids(zdata.MAX_LEN, device=device)
    empty = zdata.empty_tokens(bs, device=device)
    val_data = zdata.ShapesData(image_size=args.image_size, seed=10_000 + args.seed, device=device).next_batch(val_size)[:2]

    n_tokens = (args.image_size // zmodel.PATCH) ** 2
    print(f"[zoo.train] device={device} ({torch.cuda.get_device_name(device) if cuda else platform.processor() or 'cpu'}) "
          f"torch={torch.__version__} dit={n_dit / 1e6:.2f}M text={n_te / 1e6:.2f}M params, image tokens={n_tokens}, "
          f"batch={bs}, amp={amp_dtype}, budget={args.minutes:.1f} min, steps={args.steps}", flush=True)

    csv_path = os.path.join(args.out, "loss.csv")
    csv_file = open(csv_path, "w", newline="")
    writer = csv.writer(csv_file)
    writer.writerow(["step", "elapsed_s", "loss", "lr", "grad_norm", "images_per_s"])
    loss_acc = torch.zeros((), device=device)
    gn_acc = torch.zeros((), device=device)
    n_acc, step, last_loss = 0, 0, float("nan")
    t_loop = time.time()
    t_log, step_log = t_loop, 0
    budget_s = max(deadline - t_loop, 1e-3)
    stop_reason = "steps"
    while True:
        now = time.time()
        if args.steps is not None and step >= args.steps:
            stop_reason = "steps"
            break
        if now >= deadline:
            stop_reason = "time"
            break
        progress = max(step / args.steps if args.steps else 0.0, (now - t_loop) / budget_s)
        lr = lr_at(step, progress, args)
        for g in opt.param_groups:
            g["lr"] = lr

        x0, tokens, _ = data.next_batch(bs)
        drop = torch.rand(bs, generator=gen, device=device) < args.caption_dropout
        tokens = torch.where(drop[:, None], empty, tokens)
        loss = loss_on(fwd, text_encoder, x0, tokens, gen, img_ids, txt_ids, amp_dtype)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if ema is not None:
            d = min(args.ema, (1 + step) / (10 + step))
            torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - d)
        loss_acc += loss.detach()
        gn_acc += gn.detach()
        n_acc += 1
        step += 1

        if step % log_every == 0:
            last_loss = float(loss_acc) / n_acc  # syncs
            t_now = time.time()
            ips = (step - step_log) * bs / max(t_now - t_log, 1e-9)
            writer.writerow([step, f"{t_now - t0:.2f}", f"{last_loss:.6f}", f"{lr:.3e}", f"{float(gn_acc) / n_acc:.4f}", f"{ips:.1f}"])
            csv_file.flush()
            print(f"[zoo.train] step {step:6d}  loss {last_loss:.4f}  lr {lr:.2e}  |g| {float(gn_acc) / n_acc:.3f}  "
                  f"{ips:7.0f} img/s  {t_now - t0:6.1f}s", flush=True)
            if not math.isfinite(last_loss):
                raise FloatingPointError(f"loss is {last_loss} at step {step}")
            loss_acc.zero_()
            gn_acc.zero_()
            n_acc, t_log, step_log = 0, t_now, step
    if n_acc:
        last_loss = float(loss_acc) / n_acc
        writer.writerow([step, f"{time.time() - t0:.2f}", f"{last_loss:.6f}", f"{lr:.3e}", f"{float(gn_acc) / n_acc:.4f}", ""])
    csv_file.close()
    if cuda:
        torch.cuda.synchronize()
    train_s = time.time() - t_loop

    # choose EMA or raw weights on a fixed validation batch, then save before anything optional
    transformer.eval()
    text_encoder.eval()
    val_raw = validation_loss(transformer, text_encoder, val_data, img_ids, txt_ids, amp_dtype, seed=7)
    val_ema, shipped = None, "raw"
    if ema is not None:
        raw = [p.detach().clone() for p in params]
        with torch.no_grad():
            torch._foreach_copy_(params, ema)
        val_ema = validation_loss(transformer, text_encoder, val_data, img_ids, txt_ids, amp_dtype, seed=7)
        if val_ema <= val_raw:
            shipped = "ema"
        else:
            with torch.no_grad():
                torch._foreach_copy_(params, raw)
    config["training"] = dict(
        steps=step, images_seen=step * bs, batch_size=bs, train_seconds=round(train_s, 1), stop=stop_reason,
        lr=args.lr, min_lr_frac=args.min_lr_frac, warmup=args.warmup, weight_decay=args.weight_decay, ema=args.ema,
        caption_dropout=args.caption_dropout, seed=args.seed, amp=str(amp_dtype), compile=args.compile,
        last_train_loss=round(last_loss, 6), val_loss_raw=round(val_raw, 6),
        val_loss_ema=None if val_ema is None else round(val_ema, 6), shipped=shipped,
        dit_parameters=n_dit, text_encoder_parameters=n_te,
        device=torch.cuda.get_device_name(device) if cuda else "cpu", torch=torch.__version__,
        diffusers=__import__("diffusers").__version__,
    )
    sizes = zmodel.save(args.out, transformer, text_encoder, config)

    plot_loss(csv_path, os.path.join(args.out, "loss.png"), title=f"zoo training loss ({step} steps, batch {bs})")
    total_mb = sum(sizes.values()) / 1e6
    summary = dict(out=args.out, steps=step, images_seen=step * bs, train_seconds=round(train_s, 1),
                   wall_seconds=round(time.time() - t0, 1), stop=stop_reason, last_train_loss=round(last_loss, 4),
                   val_loss_raw=round(val_raw, 4), val_loss_ema=None if val_ema is None else round(val_ema, 4),
                   shipped=shipped, weights_mb=round(total_mb, 2))
    with open(os.path.join(args.out, "train_summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    if total_mb > 25:
        print(f"[zoo.train] WARNING: weights are {total_mb:.1f} MB, over the 25 MB budget", flush=True)
    if max(sizes.values()) > 16 * 2**20:
        print("[zoo.train] WARNING: a weight file is over 16 MiB (the device machine returns files up to 16 MiB)", flush=True)
    print("[zoo.train] summary: " + json.dumps(summary), flush=True)
    return summary


if __name__ == "__main__":
    main(t0=_T0)
