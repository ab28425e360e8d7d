"""omni-compile: a torch.compile backend (``backend="flashomni"``) that runs diffusion transformers with
FlashOmni sparse symbols (feature caching + block-sparse skipping).

``torch.compile(model, backend="flashomni")`` works without importing this package (entry point).
Import it for the configuration and the state::

    import omni_compile
    from omni_compile.policies import FlashOmni
    state = omni_compile.OmniState(omni_compile.OmniConfig(policy=FlashOmni(tau_q=0.5, tau_kv=0.05),
                                                           block_cache=omni_compile.FixedBlocks(0.5)))
    model = torch.compile(model, backend="flashomni", options={"state": state})
    model(...)
    state.sites            # every attention site found, with kind / rewritten / reason / gemm_q / gemm_o
    omni_compile.last_state()   # the state of the latest compile (a default one when none was passed)

Where things are: the backend :mod:`omni_compile.backend`; the passes :mod:`omni_compile.passes`; the ops
and the symbol format :mod:`omni_compile.ops`; the sparsity strategies :mod:`omni_compile.policies`; the
update–dispatch runtime :mod:`omni_compile.runtime` (state :mod:`omni_compile.state`, clock and schedule
:mod:`omni_compile.schedule`, block caching :mod:`omni_compile.block_cache`); the search for the fastest
setting within a quality budget ``omni_compile.tune(...)`` (module ``omni_compile/tune.py``). Benchmarks, quality tables
and figures live in :mod:`omni_compile.bench`, the learned example model and the demo in
:mod:`omni_compile.zoo`; the library imports neither.
"""

__all__ = [
    "OmniConfig", "OmniState", "SiteRecord", "Symbols", "last_state", "flashomni",
    "FixedBlocks", "ComputedShare", "ResidualChange", "FlashOmniWarning", "tune", "Budget", "WorkModel",
]

from . import ops  # noqa: F401
from .backend import flashomni
from .block_cache import ComputedShare, FixedBlocks, ResidualChange
from .config import OmniConfig
from .ops import Symbols
from .state import FlashOmniWarning, OmniState, SiteRecord, last_state
from . import tune  # a module that is also callable: omni_compile.tune(model, generate, inputs, budget)
from .tune import Budget, WorkModel

__version__ = "0.1.0"
