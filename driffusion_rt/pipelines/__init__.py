"""Text-to-image through the runtime (being split into one module per family)."""
from .core import *  # noqa: F401,F403
from .core import _dtype_keyword, _guide, _is_rank0, _noise, _supported_families  # noqa: F401
