"""Which (K, N) SGLang 0.5.17's dense int8 GEMM takes on this GPU — the shapes converter/formats/int8.py's
kernel_problem refuses (K % 16, N % 8) and accepts, tried with sgl_kernel's int8_scaled_mm as W8A8Int8LinearMethod
calls it. Prints one JSON line: {"K,N": "ok" | error}.

    PYTHONPATH=/tmp/site python3 gpu/int8_shape_probe.py      (after gpu/e2e.sh unpacked SGLang there)
"""
import json

import torch
from sgl_kernel import int8_scaled_mm

from mpconvert.formats.int8 import INT8_FORMAT

out = {}
for k, n in [(272, 544), (136, 272), (1368, 2048), (256, 1372), (256, 1376)]:
    a = torch.randint(-127, 127, (8, k), dtype=torch.int8, device="cuda")
    b = torch.randint(-127, 127, (n, k), dtype=torch.int8, device="cuda").t()  # column major, as SGLang holds it
    try:
        int8_scaled_mm(a, b, torch.ones(8, 1, device="cuda"), torch.ones(n, 1, device="cuda"),
                       out_dtype=torch.bfloat16)
        torch.cuda.synchronize()
        got = "ok"
    except RuntimeError as e:
        got = str(e).splitlines()[0][:120]
    rule = INT8_FORMAT.kernel_problem({"layout": "ct", "activation": "dynamic"}, [n], k, k, True, False, False)
    out[f"{k},{n}"] = {"gpu": got, "mpconvert refuses": rule is not None}
print(json.dumps(out))
