"""Experiment (not shipped): the shipped attention module against textual variants of itself, in one process.

    python tools/attn_variant_lab.py [--out DIR] [--seqs 4608,16896,33792] [--variants NAME,...]

Each variant is ``ops/attention.py`` with a few source lines replaced, written next to it under another
module name and imported, so its kernels compile as their own JIT functions and both run on the same
inputs, side by side with cuDNN. Rows: graph-replay ms, TFLOP/s on kept blocks, the ratio to the shipped
module, and the error against the fp32 reference (random block masks as in the benchmark; ``varied`` rows
draw the kept counts per tile).

Variants:
* ``unfold_scale`` - the scale applied to every logit before the row max (``qk * scale``, then
  ``qk - m``), as the kernel did before session 12; the shipped form takes the row max of the raw
  products, scales it once, and makes ``qk * scale - m`` one fused multiply-add per logit."""
import argparse
import importlib.util
import json
import os

import torch
import torch.nn.functional as F

from lab_common import timed_row
from omni_compile.bench import BLOCK, D, H, make_symbols, sdpa_backend_runner
from omni_compile.ops import attention as shipped
from omni_compile.ops.attention import sparse_attention_reference

VARIANTS = {
    "unfold_scale": [
        ("        qk = tl.dot(q, kt, input_precision=\"ieee\")\n    else:\n        qk = tl.dot(q, kt)\n",
         "        qk = tl.dot(q, kt, input_precision=\"ieee\")\n    else:\n        qk = tl.dot(q, kt)\n"
         "    qk = qk * qk_scale\n"),
        ("    m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)\n    p = tl.math.exp2(qk * qk_scale - m_new[:, None])\n",
         "    m_new = tl.maximum(m_i, tl.max(qk, 1))\n    p = tl.math.exp2(qk - m_new[:, None])\n"),
    ],
    "mask_last_tile": [
        ("    if MASK_KV:\n        qk = tl.where(cols[None, :] < seq_kv, qk, float(\"-inf\"))\n",
         "    if MASK_KV:\n        if start_n + BLOCK_N > seq_kv:\n"
         "            qk = tl.where(cols[None, :] < seq_kv, qk, float(\"-inf\"))\n"),
    ],
}


def load_variant(name):
    src = open(shipped.__file__).read()
    for old, new in VARIANTS[name]:
        if src.count(old) != 1:
            raise SystemExit(f"variant {name}: the text to replace occurs {src.count(old)} times")
        src = src.replace(old, new)
    path = os.path.join(os.path.dirname(shipped.__file__), f"_lab_attention_{name}.py")
    with open(path, "w") as f:
        f.write(src)
    spec = importlib.util.spec_from_file_location(f"{shipped.__package__}._lab_attention_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


ap = argparse.ArgumentParser()
ap.add_argument("--out", default=os.environ.get("OUT", "out"))
ap.add_argument("--seqs", default="4608,16896,33792")
ap.add_argument("--variants", default=",".join(VARIANTS))
args = ap.parse_args()
mods = [("shipped", shipped)] + [(v, load_variant(v)) for v in args.variants.split(",") if v]
rows = []
for S in map(int, args.seqs.split(",")):
    g = torch.Generator(device="cuda").manual_seed(S)
    q, k, v = (torch.randn(1, H, S, D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))
    flops = 4 * H * S * S * D
    label = f"S={S:5d}"
    cudnn = timed_row(rows, label, "cuDNN dense", sdpa_backend_runner(q, k, v, "cudnn"),
                      F.scaled_dot_product_attention(q, k, v), flops, S=S)
    for keep, varied in ((1.0, False), (0.5, False), (0.2, False), (0.1, False), (0.2, True)):
        sym = make_symbols(S, keep, varied=varied)
        ref, _ = sparse_attention_reference(q, k, v, sym.reuse_bits, sym.skip_bits, BLOCK, BLOCK, D ** -0.5)
        base = None
        for name, mod in mods:
            row = timed_row(rows, label, f"d={keep}{' varied' if varied else ''} {name}",
                            lambda: mod.sparse_attention(q, k, v, sym), ref, flops * sym.density(),
                            note=lambda r: (f"x{base / r['ms']:.3f} of shipped" if base else "")
                            + (f" {cudnn['ms'] / r['ms']:.3f} cuDNN" if cudnn and keep == 1.0 else ""),
                            S=S, keep=keep, varied=varied, variant=name)
            if name == "shipped" and row:
                base = row["ms"]
    del q, k, v
    torch.cuda.empty_cache()
os.makedirs(args.out, exist_ok=True)
json.dump(rows, open(os.path.join(args.out, "attn_variant_lab.json"), "w"), indent=1)
for name, _ in mods[1:]:
    os.remove(os.path.join(os.path.dirname(shipped.__file__), f"_lab_attention_{name}.py"))
