# The worked example of docs/policies.md ("Writing a policy"): tests/test_policies.py checks that the docs
# show this file verbatim and runs it through the compiled graph.
from dataclasses import dataclass

import torch

from omni_compile.policies import BasePolicy, PolicyInput, no_bits, register_policy


@dataclass(frozen=True)
class Band(BasePolicy):
    """1-D locality along the token sequence: each vision query block keeps the key blocks within
    ``width`` blocks of its own position, and every text key block. Needs no layout and no scores."""

    width: int = 1
    """Key blocks kept on each side. Smaller skips more (faster) but cuts attention to far tokens."""

    name = "band"

    def __call__(self, inp: PolicyInput, config):
        reuse, skip = no_bits(inp)  # nothing reused, nothing skipped yet: [B, H, nQ], [B, H, nQ, nK]
        if inp.kind == "cross":     # keys are text: keep them all
            return reuse, skip
        # the key block holding each query block's first token
        diag = torch.arange(inp.num_q_blocks, device=inp.device) * inp.block_q // inp.block_kv
        kb = torch.arange(inp.num_kv_blocks, device=inp.device)
        far = (kb.view(1, -1) - diag.view(-1, 1)).abs() > self.width        # [nQ, nK]
        far &= ~inp.q_text.view(-1, 1) & ~inp.kv_text.view(1, -1)          # text rows and keys stay
        return reuse, skip | far                                            # broadcasts over [B, H]


register_policy("band", Band(), replace=True)
