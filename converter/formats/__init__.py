"""One module per format; importing this package registers them all (see base.FORMATS)."""
from . import awq, fp8, gptq, int8, unquantized  # noqa: F401  (registration)
from .base import FORMATS, Expect, Format, Scheme, check_expected  # noqa: F401
