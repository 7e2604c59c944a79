#!/usr/bin/env bash
# Does SGLang 0.5.23 (which pins torch 2.14.1) import and serve on the GPU machine's torch 2.11? Unpacks
# .gpu/sglang-0.5.23-site.tar.xz (gpu/make-bundle-0.5.23.sh) and runs, each step recorded in $OUT/probe-0.5.23.txt:
# torch's version, importing sgl_kernel (built against torch 2.14.1), importing sglang, and the shared smoke test
# (a tiny random Llama through sgl.Engine). Run from the repository root on the device machine.
set -u
out=${OUT:-/tmp}/probe-0.5.23.txt
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
site=/tmp/site23
[ -f $site/sglang/__init__.py ] || { mkdir -p $site && tar -C $site -xJf .gpu/sglang-0.5.23-site.tar.xz; }
export PYTHONPATH=$site PATH=/usr/local/cuda/bin:$PATH
step() { echo "== $1" | tee -a "$out"; shift; timeout 300 "$@" >> "$out" 2>&1; echo "-- exit $?" | tee -a "$out"; }
: > "$out"
step "torch" python3 -c "import torch; print(torch.__version__, torch.cuda.get_device_name(0))"
step "import sgl_kernel" python3 -c "import sgl_kernel; print(sgl_kernel.__file__)"
step "import sglang" python3 -c "import sglang; print(sglang.__version__); import sglang.srt.entrypoints.engine"
step "smoke (sgl.Engine, tiny Llama)" python3 .gpu/smoke.py --site $site --mode engine
tail -c 6000 "$out"
