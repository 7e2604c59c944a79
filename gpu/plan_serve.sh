#!/usr/bin/env bash
# The planned SmolLM2 checkpoint on the GPU machine, over several calls (gpu/plan_serve.py stage made .gpu-plan/):
#   bash gpu/plan_serve.sh setup    (carry .gpu: the SGLang bundle and kernel cache, as gpu/pack.py stages them)
#   bash gpu/plan_serve.sh part DIR (carry DIR, one part.NN of .gpu-plan moved into it: appended to /tmp/plan.tar)
#   bash gpu/plan_serve.sh run      (unpack, serve through the shim, perplexity on the held-out windows → $OUT)
#   bash gpu/plan_serve.sh sources  (after stage-sources' parts: plan on the GPU, single-source builds vs sources)
#   bash gpu/plan_serve.sh formats  (after gpu/formats_serve.py stage's parts: issue 17's shim-vs-export serving)
#   bash gpu/plan_serve.sh fp8probe (after gpu/fp8_model_probe.py stage's parts: the FP8 checkpoint five ways)
set -euo pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
case "$1" in
  setup)
    mkdir -p /tmp/site && tar -C /tmp/site -xJf .gpu/sglang-0.5.17-site.tar.xz
    mkdir -p /tmp/site/sgl_kernel/sm100 && ln -sf ../sm90/common_ops.abi3.so /tmp/site/sgl_kernel/sm100/common_ops.abi3.so
    tar -C /tmp -xJf .gpu/sglang-0.5.17-jit-sm90.tar.xz
    rm -f /tmp/plan.tar; ls /tmp/site | head -3; nvidia-smi --query-gpu=name --format=csv,noheader ;;
  reset)
    rm -f /tmp/plan.tar ;;
  part)
    for p in "$2"/part.*; do cat "$p" >> /tmp/plan.tar; echo "appended $p"; done; ls -la /tmp/plan.tar ;;
  run|sources|formats|fp8probe)
    [ "$1" = run ] && rm -rf /tmp/planned && tar -C /tmp -xf /tmp/plan.tar
    [ "$1" = sources ] && rm -rf /tmp/src && tar -C /tmp -xf /tmp/plan.tar
    [ "$1" = formats ] && [ ! -d /tmp/formats ] && tar -C /tmp -xf /tmp/plan.tar
    [ "$1" = fp8probe ] && rm -rf /tmp/fp8m && tar -C /tmp -xf /tmp/plan.tar
    rm -rf /tmp/mp && mkdir -p /tmp/mp/mpconvert-0.1.0.dist-info
    cp -r converter /tmp/mp/mpconvert && cp -r cli /tmp/mp/mpconvert/cli && cp -r runtime_shim /tmp/mp/mpconvert/runtime_shim
    printf 'Metadata-Version: 2.1\nName: mpconvert\nVersion: 0.1.0\n' > /tmp/mp/mpconvert-0.1.0.dist-info/METADATA
    printf '[sglang.srt.plugins]\nmpconvert = mpconvert.runtime_shim:register\n' \
      > /tmp/mp/mpconvert-0.1.0.dist-info/entry_points.txt
    export PYTHONPATH=/tmp/site:/tmp/mp:${PYTHONPATH:-} PATH=/usr/local/cuda/bin:$PATH TVM_FFI_CACHE_DIR=/tmp/tvmcache
    if [ "$1" = run ]; then
      python3 gpu/plan_serve.py serve /tmp/planned "${OUT:-/tmp}/plan_serve.json" 2>&1 | grep -v "Warning" | tail -40
    elif [ "$1" = fp8probe ]; then
      python3 gpu/fp8_model_probe.py run /tmp/fp8m "${OUT:-/tmp}/fp8_model_probe.json" 2>&1 | grep -v "Warning" | tail -20
    elif [ "$1" = formats ]; then
      mkdir -p /tmp/formats-runs && shift
      python3 gpu/formats_serve.py serve /tmp/formats /tmp/formats-runs "$@" > /tmp/formats-runs/log 2>&1 || true
      cp /tmp/formats-runs/*.json /tmp/formats-runs/log "${OUT:-/tmp}/" 2>/dev/null || true
      grep -v "Warning" /tmp/formats-runs/log | tail -30
    else
      python3 gpu/plan_serve.py sources /tmp/src "${OUT:-/tmp}/plan_sources.json" 2>&1 | grep -v "Warning" | tail -40
    fi ;;
esac
