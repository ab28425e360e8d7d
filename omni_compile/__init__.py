"""omni-compile: a torch.compile backend (``backend="flashomni"``) that runs diffusion transformers with
FlashOmni sparse symbols (feature caching + block-sparse skipping).

``torch.compile(model, backend="flashomni")`` works without importing this package (entry point).
Import it for the configuration and the state::

    import omni_compile
    state = omni_compile.OmniState(omni_compile.OmniConfig(policy="dense"))
    model = torch.compile(model, backend="flashomni", options={"state": state})
    model(...)
    state.sites            # every attention site found, with kind / rewritten / reason / gemm_q / gemm_o
    omni_compile.last_state()   # the state of the latest compile (a default one when none was passed)

``omni_compile.ops`` holds the symbol format and the ops that read it.
"""

from . import ops  # noqa: F401
from .config import OmniConfig
from .ops import Symbols  # noqa: F401
from .state import OmniState, SiteRecord, last_state

__version__ = "0.1.0"

__all__ = ["OmniConfig", "OmniState", "SiteRecord", "Symbols", "last_state", "flashomni"]


def __getattr__(name):
    if name == "flashomni":
        from .backend import flashomni

        return flashomni
    raise AttributeError(name)
