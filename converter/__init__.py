"""mpconvert: merge quantized checkpoints of one model into one mixed-precision checkpoint with a manifest."""

__version__ = "0.1.0"
