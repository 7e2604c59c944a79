#!/usr/bin/env bash
# The GPU proof in one command on the lent GPU machine (after `gpu/pack.py PART` here; carry .gpu):
#   bash gpu/e2e.sh PART   (a key of PARTS in gpu/pack.py: dense, moe, experts, qwen2, gemma3, …)
# Unpacks SGLang 0.5.17 (../shared/gpu bundle) and its kernel cache, installs mpconvert (with its SGLang plugin entry
# point) into /tmp/mp, runs gpu/driver.py, and brings back results.json, report.md, logs.tar.xz and — when new kernels
# were compiled — tvmcache.tar.xz (keep it as gpu/results/tvmcache.tar.xz for the next run).
set -euo pipefail
PART=${1:?a part of gpu/pack.py}
OUT=${OUT:-/tmp/e2e-out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
STAGE=${GPU_STAGE:-.gpu}  # gpu/pack.py's folder (GPU_STAGE there too)
if [ ! -f /tmp/site/sglang/__init__.py ]; then
  if [ ! -f "$STAGE/sglang-0.5.17-site.tar.xz" ]; then
    echo "no SGLang here: $STAGE was packed --no-site for a warm machine"; exit 3
  fi
  mkdir -p /tmp/site && tar -C /tmp/site -xJf "$STAGE/sglang-0.5.17-site.tar.xz"
  mkdir -p /tmp/site/sgl_kernel/sm100 && ln -sf ../sm90/common_ops.abi3.so /tmp/site/sgl_kernel/sm100/common_ops.abi3.so
fi
if [ -f "$STAGE/sglang-0.5.17-jit-sm90.tar.xz" ]; then  # (not there: packed --no-kernels, after a part that had them)
  tar -C /tmp -xJf "$STAGE/sglang-0.5.17-jit-sm90.tar.xz"  # merged into what an earlier call left there
fi
# mpconvert as an installed distribution (its entry point is how SGLang's workers find the shim), no build tools needed
rm -rf /tmp/mp && mkdir -p /tmp/mp/mpconvert-0.1.0.dist-info
cp -r converter /tmp/mp/mpconvert && cp -r cli /tmp/mp/mpconvert/cli && cp -r runtime_shim /tmp/mp/mpconvert/runtime_shim
printf 'Metadata-Version: 2.1\nName: mpconvert\nVersion: 0.1.0\n' > /tmp/mp/mpconvert-0.1.0.dist-info/METADATA
cp gpu/measure_plugin.py /tmp/mp/e2e_measure.py  # prints each worker's exact weight bytes after loading
printf '[sglang.srt.plugins]\nmpconvert = mpconvert.runtime_shim:register\ne2e_measure = e2e_measure:register\n' \
  > /tmp/mp/mpconvert-0.1.0.dist-info/entry_points.txt
export PYTHONPATH=/tmp/site:/tmp/mp:${PYTHONPATH:-} PATH=/usr/local/cuda/bin:$PATH TVM_FFI_CACHE_DIR=/tmp/tvmcache
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
find /tmp/tvmcache -type f | sort > /tmp/tvm-before
python3 gpu/driver.py "$PART" "$OUT" || echo "driver exit $?"
find /tmp/tvmcache -type f | sort > /tmp/tvm-after
if ! cmp -s /tmp/tvm-before /tmp/tvm-after; then
  echo "new kernels compiled: packing the cache"; tar -C /tmp -cf - tvmcache | xz -6 -T8 > "$OUT/tvmcache.tar.xz"
fi
ls -la "$OUT"
