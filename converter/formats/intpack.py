"""Bit packing shared by the int4/int8 formats: k-bit values packed into int32 words, first value lowest."""
from __future__ import annotations


def unpack_rows(packed, bits: int):
    """[R, C] int32 holding 32/bits values per word along rows → [R*32/bits, C] ints (row r*pf+i = field i)."""
    import torch

    pf, mask = 32 // bits, (1 << bits) - 1
    shifts = torch.arange(pf, dtype=torch.int32) * bits
    vals = (packed.unsqueeze(1) >> shifts[None, :, None]) & mask  # [R, pf, C]
    return vals.reshape(packed.shape[0] * pf, packed.shape[1])


def unpack_cols(packed, bits: int, order: list[int] | None = None):
    """[R, C] int32 packed along columns → [R, C*pf]; `order[k]` is the column offset that field k holds."""
    import torch

    pf, mask = 32 // bits, (1 << bits) - 1
    shifts = torch.arange(pf, dtype=torch.int32) * bits
    vals = (packed.unsqueeze(2) >> shifts[None, None, :]) & mask  # [R, C, pf]: field k
    if order is not None:
        inverse = sorted(range(pf), key=lambda k: order[k])  # inverse[j] = field holding offset j
        vals = vals[:, :, inverse]
    return vals.reshape(packed.shape[0], packed.shape[1] * pf)


def pack_cols(vals, bits: int):
    """Inverse of unpack_cols without reordering: [R, C*pf] small ints → [R, C] int32."""
    import torch

    pf = 32 // bits
    v = vals.to(torch.int64).reshape(vals.shape[0], -1, pf)
    word = torch.zeros(v.shape[:2], dtype=torch.int64)
    for k in range(pf):
        word |= v[:, :, k] << (bits * k)
    word = torch.where(word >= 2**31, word - 2**32, word)
    return word.to(torch.int32)
