"""Bit packing shared by the int4/int8 formats: k-bit values packed into int32 words, first value lowest; and the
wna16 scheme that GPTQ and AWQ are repacked into (Format.repack), which both name."""
from __future__ import annotations

import numpy as np

from .base import Scheme

# the stored tensor each written one comes from, for both GPTQ's and AWQ's repack (their qweight, scales, qzeros)
REPACK_FROM = {"weight_packed": "qweight", "weight_scale": "scales", "weight_zero_point": "qzeros"}


def repacked_scheme(bits: int, group_size: int, symmetric: bool, source: str) -> Scheme:
    """The wna16 (compressed-tensors pack-quantized) scheme an integer format is repacked into (group_size -1: the
    channel strategy)."""
    return Scheme.of("wna16", bits=bits, strategy="group" if group_size > 0 else "channel", group_size=group_size,
                     symmetric=symmetric, repacked_from=source)


def unpack_rows(packed, bits: int):
    """[R, C] int32 holding 32/bits values per word along rows → [R*32/bits, C] ints (row r*pf+i = field i)."""
    import torch

    pf, mask = 32 // bits, (1 << bits) - 1
    shifts = torch.arange(pf, dtype=torch.int32) * bits
    vals = (packed.unsqueeze(1) >> shifts[None, :, None]) & mask  # [R, pf, C]
    return vals.reshape(packed.shape[0] * pf, packed.shape[1])


def unpack_cols(packed, bits: int, order: list[int] | None = None):
    """[R, C] int32 packed along columns → [R, C*pf]; `order[k]` is the column offset that field k holds. Takes a
    torch tensor or a numpy array (the value checks run on numpy) and returns the same kind."""
    pf, mask = 32 // bits, (1 << bits) - 1
    if isinstance(packed, np.ndarray):
        shifts = np.arange(pf, dtype=np.int32) * bits
    else:
        import torch

        shifts = torch.arange(pf, dtype=torch.int32) * bits
    vals = (packed[:, :, None] >> shifts[None, None, :]) & mask  # [R, C, pf]: field k
    if order is not None:
        inverse = sorted(range(pf), key=lambda k: order[k])  # inverse[j] = field holding offset j
        vals = vals[:, :, inverse]
    return vals.reshape(packed.shape[0], packed.shape[1] * pf)


def pack_cols(vals, bits: int):
    """Inverse of unpack_cols without reordering: [R, C*pf] small ints → [R, C] int32 (a torch tensor or a numpy
    array, as given: build's exact rewrites run on numpy)."""
    pf = 32 // bits
    if isinstance(vals, np.ndarray):
        v = vals.astype(np.uint32).reshape(vals.shape[0], -1, pf)
        word = np.zeros(v.shape[:2], dtype=np.uint32)
        for k in range(pf):
            word |= v[:, :, k] << np.uint32(bits * k)
        return word.view(np.int32)
    import torch

    return torch.from_numpy(pack_cols(vals.numpy(), bits))  # a repack's tensors: the same packing


def round_to_nearest_int(w, bits: int, group_size: int, symmetric: bool):
    """Round-to-nearest b-bit integer quantization of w [out, in] in groups of `group_size` inputs (-1: one group per
    row), dequantized: symmetric as GPTQ's sym (zero at the midpoint, scale 2·absmax/maxq), asymmetric as AWQ's
    (min..max over maxq steps, integer zero)."""
    import torch

    out_f, in_f = w.shape
    gs = group_size if group_size > 0 else in_f
    pad = -in_f % gs
    x = torch.nn.functional.pad(w.float(), (0, pad)).reshape(out_f, -1, gs)
    maxq = 2 ** bits - 1
    if symmetric:
        scale = 2 * x.abs().amax(-1, keepdim=True) / maxq
        scale[scale == 0] = 1
        zero = torch.full_like(scale, (maxq + 1) / 2)
    else:
        lo, hi = x.amin(-1, keepdim=True).clamp(max=0), x.amax(-1, keepdim=True).clamp(min=0)
        scale = ((hi - lo) / maxq).clamp(min=1e-5)
        zero = (-torch.round(lo / scale)).clamp(0, maxq)
    q = (torch.round(x / scale) + zero).clamp(0, maxq)
    return ((q - zero) * scale).reshape(out_f, -1)[:, :in_f]
