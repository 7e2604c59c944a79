"""SGLang runtime shim: serve an mpconvert directory on SGLang's native kernels. Work in progress (issue 4).

Nothing is registered with SGLang yet, so SGLang refuses a converted directory (unknown quant_method "mpconvert")
instead of serving it wrongly.
"""
