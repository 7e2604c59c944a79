"""Compile SGLang's slow JIT kernels for sm_90a here, on the CPU machine, so the GPU run does not.

SGLang 0.5.17 JIT-compiles its Marlin kernels on first use; one translation unit each, 4-6 minutes of nvcc apiece
(the fp16 GPTQ Marlin GEMM and the fp16 MoE Marlin GEMM cost two earlier GPU runs their time budget). SGLang loads a
kernel straight from `$TVM_FFI_CACHE_DIR/<module>__arch_9.0a__tvmffi_<v>/<module>.so` when that file exists (no
ninja, no mtime check), and the module name hashes the kernel sources, so a .so built here from the same SGLang
release, with the same nvcc major version (13.0, as on the GPU machine), is the one the GPU run would have built.

    .venv/bin/python gpu/prebuild_kernels.py gpu/results/kernels    # a TVM_FFI_CACHE_DIR; gpu/pack.py stages it

Needs CUDA 13.0 (nvcc, libcudart) under /usr/local/cuda or $CUDA_HOME. Builds run in parallel, one process per
kernel (each is a single nvcc invocation): on a 2-core machine one alone takes about 4 minutes, three at once about
8; a kernel already in OUT is loaded, not rebuilt.
"""
from __future__ import annotations

import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

# (what, builder module, function, args) — the kernels the GPTQ MoE runs need in float16 (GPTQ MoE on Marlin runs
# in fp16 only: see the shim's dtype check), plus the EP variant of the MoE GEMM (SGLang passes is_ep when it holds
# an expert map), and the bf16 MoE GEMM AWQ's MoE runs.
KERNELS = [
    ("gptq_marlin fp16", "sglang.kernels.ops.quantization.gptq_marlin", "_jit_gptq_marlin_module", ("float16",)),
    ("moe_wna16_marlin fp16", "sglang.kernels.ops.moe.moe_wna16_marlin", "_jit_moe_wna16_marlin_module",
     ("float16", False, False)),
    ("moe_wna16_marlin fp16 ep", "sglang.kernels.ops.moe.moe_wna16_marlin", "_jit_moe_wna16_marlin_module",
     ("float16", True, False)),
    # AWQ MoE runs bf16 on the same Marlin MoE GEMM: missing from the cache, it held the MoE part's AWQ and mixed
    # runs past their time limit on 2026-12-06 (docs/gpu-results.md §16)
    ("moe_wna16_marlin bf16", "sglang.kernels.ops.moe.moe_wna16_marlin", "_jit_moe_wna16_marlin_module",
     ("bfloat16", False, False)),
]


def _build(job: tuple[str, str, str, tuple], out: str) -> tuple[str, float, str]:
    import importlib
    import os

    import torch

    os.environ["TVM_FFI_CACHE_DIR"] = out
    # tvm-ffi takes the CUDA home from nvcc's location; a /usr/local/bin/nvcc wrapper would send it to link against a
    # /usr/local/lib64 that holds no libcudart
    os.environ.setdefault("CUDA_HOME", "/usr/local/cuda")
    from sglang.kernels.jit.utils import compile as jit_compile
    from sglang.kernels.jit.utils.arch import override_jit_cuda_arch

    # link libstdc++ statically, as the GPU machine's own compiler does for these kernels: the .so then needs no
    # particular libstdc++ version there (only libtvm_ffi, libcudart, libgcc_s and libc, like its own builds)
    jit_compile.DEFAULT_LDFLAGS.append("-static-libstdc++")

    what, module, function, args = job
    args = tuple(getattr(torch, a) if isinstance(a, str) else a for a in args)
    start = time.time()
    with override_jit_cuda_arch(9, 0):  # the H100/H200's sm_90a; this machine has no GPU to detect
        try:
            getattr(importlib.import_module(module), function)(*args)
        except Exception as error:  # loading a CUDA module fails on a machine without a driver: the .so is what we want
            if not list(Path(out).glob("*/*.so")):
                raise
            note = f"built (load here failed as expected: {type(error).__name__})"
        else:
            note = "built and loaded"
    return what, time.time() - start, note


def main(out: str) -> int:
    Path(out).mkdir(parents=True, exist_ok=True)
    with ProcessPoolExecutor(max_workers=len(KERNELS)) as pool:
        for what, seconds, note in pool.map(_build, KERNELS, [out] * len(KERNELS)):
            print(f"{what}: {note} in {seconds:.0f} s", flush=True)
    for so in sorted(Path(out).glob("*/*.so")):
        print(so.relative_to(out), so.stat().st_size)
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    sys.exit(main(sys.argv[1]))
