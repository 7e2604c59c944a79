#!/usr/bin/env bash
# Builds sglang-0.5.23-site.tar.xz, as ../shared/gpu/make-bundle.sh builds the 0.5.17 one: SGLang 0.5.23 (which pins
# torch 2.14.1; its sglang-kernel 0.4.10 is built against it) and the packages the GPU machine's image lacks, for its
# Python 3.12 + torch 2.11.0+cu130 — to see whether 0.5.23 imports and serves there at all, unpacked into one folder and packed with xz (must stay under ~60 MiB
# so that it travels in one device call). Run on a CPU machine with pip access: bash make-bundle.sh OUT.tar.xz
set -euo pipefail
out=${1:?usage: make-bundle.sh OUT.tar.xz}
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
pins="annotated_types==0.8.0 cffi==2.1.1 dill==0.4.1 ipython==9.18.1 jiter==0.19.0 jsonschema_specifications==2025.9.1
msgspec==0.22.0 pybase64==1.5.1 pycparser==3.12 pydantic_core==2.50.5 pyzmq==27.3.0 referencing==0.37.0 setproctitle==1.3.8
sglang==0.5.23 sniffio==1.3.1 soundfile==0.13.1 starlette==1.10.0 transformers==5.19.0 typing_extensions==4.16.0
uvicorn==0.54.0 apache_tvm_ffi==0.1.11 compressed_tensors==0.18.0 distro==1.9.0 fastapi==0.165.0
flashinfer_python==0.7.2 gguf==0.19.0 jsonschema==4.26.0 loguru==0.7.3 openai==2.8.0 opentelemetry_api==1.45.2
orjson==3.13.0 partial_json_parser==0.2.1.1.post7 pydantic==2.14.4 python_multipart==0.0.34 rpds_py==2026.9.1
sglang_kernel==0.4.10 tokenizers==0.23.2 traitlets==5.16.1 typing_inspection==0.4.5 xgrammar==0.2.7"
plat=""; for n in 39 35 34 28 27 26 24 17 5; do plat="$plat --platform manylinux_2_${n}_x86_64"; done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  $plat --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$work/whl" $pins
mkdir -p "$work/site"
for w in "$work"/whl/*.whl; do python3 -m zipfile -e "$w" "$work/site"; done
cd "$work/site"
# Unused on an H100 with --attention-backend triton: FlashAttention (1.1 GB), sm100 kernels, FlashMLA, InfLLM.
rm -rf sgl_kernel/flash_ops.abi3.so sgl_kernel/sm100 sgl_kernel/flashmla_ops.abi3.so sgl_kernel/infllm_ops*.so
mkdir -p sgl_kernel/sm100 && ln -s ../sm90/common_ops.abi3.so sgl_kernel/sm100/common_ops.abi3.so
find xgrammar -name '*.a' -delete; find xgrammar -name '*.so' -exec strip --strip-debug {} +
rm -rf ./*.data
tar -cf - . | xz -9e -T2 > "$out"
ls -la "$out"
