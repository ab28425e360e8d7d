"""``omni_compile.ops``: sparse symbols and the ops that read them.

Each op family lives in its own module (reference + Triton kernel + ``torch.library`` registration in
namespace ``flashomni``). This package imports torch and triton only.
"""

from ._common import kernel_backend, triton_interpreting
from .attention import sparse_attention, sparse_attention_reference
from .flashomni_policy import flashomni_symbols, flashomni_symbols_reference
from .linear_o import cache_bias_for, sparse_linear_o, sparse_linear_o_reference
from .linear_q import sparse_linear_q, sparse_linear_q_reference
from .pooled import pooled_scores, pooled_scores_reference
from .taylor import taylor_refresh, taylor_refresh_reference, taylor_sum, taylor_sum_reference
from .symbols import Symbols, pack_bits, unpack_bits

__all__ = [
    "Symbols",
    "pack_bits",
    "unpack_bits",
    "sparse_attention",
    "sparse_attention_reference",
    "sparse_linear_q",
    "sparse_linear_q_reference",
    "sparse_linear_o",
    "sparse_linear_o_reference",
    "cache_bias_for",
    "flashomni_symbols",
    "flashomni_symbols_reference",
    "pooled_scores",
    "pooled_scores_reference",
    "taylor_sum",
    "taylor_sum_reference",
    "taylor_refresh",
    "taylor_refresh_reference",
    "kernel_backend",
    "triton_interpreting",
]
