"""One module per format; importing this package registers them all (see base.FORMATS and base.READERS)."""
from . import awq, compressed_tensors, fp8, gptq, int8, unquantized, wna16  # noqa: F401  (registration)
from .base import FORMATS, READERS, Expect, Format, Scheme, check_expected  # noqa: F401
