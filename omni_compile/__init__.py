"""omni-compile: a torch.compile backend that runs diffusion transformers on FlashOmni sparse symbols.

``omni_compile.ops`` holds the symbol format and the ops that read it.
"""

from . import ops  # noqa: F401
from .ops import Symbols  # noqa: F401

__version__ = "0.1.0"
