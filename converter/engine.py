"""verify --engine sglang: does SGLang, through the shim, bind every layer to the native method the manifest implies?

Runs `mpconvert.runtime_shim.engine_check` (SGLang's real classes on CPU, one process per TP rank, gloo) for TP=1
and for TP=N, and compares for every manifest unit the quant method (and scheme) the layer resolved to with what its
format says SGLang should bind (`Format.sglang_methods`). Also a finding: any parameter SGLang's `load_weights` never
wrote (a checkpoint tensor the model loader skipped), a weight-sized float parameter in a quantized unit (a
dequantized copy), and any load-time refusal by SGLang or the shim.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from . import rules
from .formats import FORMATS
from .formats.base import CT_LAYOUT
from .layout import UNQUANTIZED_ONLY_SLOTS, role_of
from .manifest import EXPERT_GROUPS

CHECK = "mpconvert.runtime_shim.engine_check"
TIMEOUT_S = 1800
GRACE_S = 60  # how long the other ranks may take to end after one has (they normally end together)


def run_ranks(directory: Path, tp: int, dtype: str, ep: int = 1, shim: bool = True) -> list[dict]:
    """One engine_check process per rank (EP, as SGLang's --ep, splits the experts over the TP ranks); their parsed
    results (or {"error": ...}). shim=False: SGLang loads no plugin (a compressed-tensors export must load without
    mpconvert)."""
    with tempfile.TemporaryDirectory(prefix="mpconvert-engine-") as tmp:
        return _run_ranks(directory, tp, dtype, ep, shim, rendezvous(Path(tmp)))


def rendezvous(folder: Path) -> str:
    """The ranks meet through a file (torch's FileStore) in a folder of this run's own, not a TCP port: a port chosen
    free and bound later by rank 0 can be taken meanwhile by anything else on the machine (two `verify --engine` at
    once: EADDRINUSE, reported as an engine finding — a false one)."""
    return (folder / "rendezvous").as_uri()


def _run_ranks(directory: Path, tp: int, dtype: str, ep: int, shim: bool, init_method: str) -> list[dict]:
    env = {**os.environ, "SGLANG_DTYPE": dtype}
    if not shim:
        env["SGLANG_PLUGINS"] = "no-plugins"  # SGLang's plugin allow-list: a name no plugin has
    procs = [subprocess.Popen([sys.executable, "-m", CHECK, str(directory), init_method, str(tp), str(rank), str(ep)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for rank in range(tp)]
    results = []
    for outcome in wait_ranks(procs):
        if isinstance(outcome, dict):
            results.append(outcome)
            continue
        stdout, stderr, code = outcome
        line = [x for x in stdout.splitlines() if x.startswith("RESULT ")]
        if line:
            results.append(json.loads(line[-1][7:]))
        else:
            tail = [x for x in stderr.strip().splitlines() if x.strip()][-1:] or [f"exit code {code}"]
            results.append({"error": f"SGLang crashed building the model: {tail[0]}"})
    return results


def wait_ranks(procs: list[subprocess.Popen], grace_s: float = GRACE_S, timeout_s: float = TIMEOUT_S) -> list:
    """Every rank's (stdout, stderr, exit code), their pipes read side by side (a rank's output never waits on
    another's). SGLang's ranks wait for each other in their collectives: a rank that ends while others run (it
    refused the model or crashed) leaves them waiting for ever — they are given grace_s to end too, then stopped, and
    their entry says so ({"error": ...}) instead of verify hanging until timeout_s."""
    outcomes: list = [None] * len(procs)

    def read(i: int, p: subprocess.Popen) -> None:
        stdout, stderr = p.communicate()
        outcomes[i] = (stdout, stderr, p.returncode)

    readers = [threading.Thread(target=read, args=(i, p), daemon=True) for i, p in enumerate(procs)]
    for t in readers:
        t.start()
    start, first_end, stopped = time.monotonic(), None, {}
    try:
        while any(t.is_alive() for t in readers):
            now = time.monotonic()
            ended = [i for i, p in enumerate(procs) if p.poll() is not None]
            if ended and first_end is None:
                first_end = (now, ended[0])
            late = first_end is not None and now - first_end[0] > grace_s
            if late or now - start > timeout_s:
                why = (f"stopped: still waiting {grace_s:.0f} s after rank {first_end[1]} ended (SGLang's ranks "
                       f"wait for each other; that rank's entry says why it ended)") if late else \
                    f"timed out after {timeout_s} s"
                for i, p in enumerate(procs):
                    if p.poll() is None:
                        stopped[i] = why
                        p.kill()
            for t in readers:
                t.join(timeout=0.2)
    except BaseException:  # Ctrl-C, SIGTERM: the ranks go too (left, they would wait for each other for ever)
        for p in procs:
            if p.poll() is None:
                p.kill()
        raise
    return [{"error": stopped[i]} if i in stopped else outcomes[i] for i in range(len(procs))]


def expected_layers(manifest, ep: int = 1, ep_rank: int = 0) -> dict[str, tuple[str, str, str | None]]:
    """SGLang layer prefix → (format, quant-method class, scheme class or None) that the shim must bind there. A
    mixed-experts MoE layer gets MixedExpertsMethod, and each of its format groups (`expert_groups.N` under it) with
    experts on this expert-parallel rank its format's native MoE method."""
    out = {}
    exported = manifest.layout == CT_LAYOUT  # SGLang's own compressed-tensors config binds them, not the shim

    def methods(fmt: str, params: dict, moe: bool) -> tuple[str, str | None]:
        f = FORMATS[fmt]
        return f.ct_methods(params, moe) if exported else f.sglang_methods(params, moe)

    for unit, spec in manifest.units.items():
        fmt = spec.format
        role = role_of(unit)
        if role is not None and role.slot in UNQUANTIZED_ONLY_SLOTS:
            continue  # a plain torch Linear in SGLang (no quant method to check); load_weights must still fill it
        if unit.endswith("lm_head"):
            # ParallelLMHead: an unquantized head gets SGLang's embedding method, not a linear one
            out[unit] = (fmt, "UnquantizedEmbeddingMethod", None) if fmt == "unquantized" else \
                (fmt, *methods(fmt, spec.params, False))
        elif spec.groups:
            out[unit] = (spec.describe(), "MixedExpertsMethod", None)
            per_rank = manifest.model.num_experts // ep  # SGLang's contiguous expert range of this rank
            on_rank = range(ep_rank * per_rank, (ep_rank + 1) * per_rank)
            for i, g in enumerate(spec.groups):
                if any(e in on_rank for e in g.experts):
                    out[f"{unit}.{EXPERT_GROUPS}.{i}"] = (g.format, *methods(g.format, g.params, True))
        else:
            out[unit] = (fmt, *methods(fmt, spec.params, unit.endswith(".experts")))
    return out


def compare(manifest, result: dict, label: str, rep) -> None:
    if "error" in result:
        rep.add("engine", label, result["error"])
        return
    config = "CompressedTensorsConfig" if manifest.layout == CT_LAYOUT else "MpconvertConfig"
    if result.get("quant_config") != config:
        rep.add("engine", label, f"SGLang read the model with {result.get('quant_config')}, not {config} (the "
                                 f"{manifest.layout} layout's); config.json does not say what build wrote")
    got = result["methods"]
    expected = expected_layers(manifest, result.get("ep", 1), result.get("ep_rank", 0))
    _fused_shared_experts(manifest, expected, result.get("fused_shared", {}), label, rep)
    for prefix, (fmt, method, scheme) in sorted(expected.items()):
        if prefix not in got:
            rep.add("engine", f"{label} {prefix}", f"SGLang built no quantized layer at this prefix ({fmt} expected "
                                                   f"{method}); the model class names its layers differently")
            continue
        m, s = got[prefix]
        if m != method or (scheme is not None and s != scheme):
            want = method + (f"/{scheme}" if scheme else "")
            rep.add("engine", f"{label} {prefix}", f"{fmt} resolved to {m}/{s}, expected {want}")
    _no_float_copies(expected, result, label, rep)
    for name in result["untouched"]:
        rep.add("engine", f"{label} {name}", "SGLang's load_weights never wrote this parameter (a checkpoint tensor "
                                             "was skipped or renamed by the model loader)")


def _fused_shared_experts(manifest, expected: dict, fused: dict, label: str, rep) -> None:
    """Where SGLang fused a layer's shared experts into its FusedMoE (on a GPU: DeepSeek-V3 at 256 experts, GLM-4.5)
    they are no layers of their own: their weights load as extra experts through the routed experts' quant method, so
    their expected layers are taken out of `expected`; a layer the shim should have kept unfused is the finding."""
    for experts in fused:
        if experts not in manifest.units:
            continue
        why = rules.shared_experts_fusion_problem(manifest.units, experts)
        if why:
            rep.add("engine", f"{label} {experts}", f"SGLang fused the shared experts into it, loading them through "
                                                    f"the routed experts' quant method, but {why}: wrong values; "
                                                    f"serve with --disable-shared-experts-fusion")
        for unit in rules.shared_experts_of(manifest.units, experts):
            expected.pop(unit, None)


FLOAT = ("torch.bfloat16", "torch.float16", "torch.float32")


def _no_float_copies(expected: dict, result: dict, label: str, rep) -> None:
    """A quantized layer must hold no float tensor as large as a weight matrix: that would be a dequantized copy
    (memory and speed lost, and a sign the native kernel is not the one in use)."""
    quantized = {p: fmt for p, (fmt, _, _) in expected.items() if fmt != "unquantized"}
    for name, (dtype, shape, _) in result["params"].items():
        prefix = name.rsplit(".", 1)[0]
        if prefix not in quantized or dtype not in FLOAT or len(shape) < 2:
            continue
        rows, cols = shape[-2], shape[-1]
        if min(rows, cols) >= 64 and rows * cols >= 64 * 64 and not name.endswith(("scale", "scales", "scale_inv")):
            rep.add("engine", f"{label} {name}", f"{quantized[prefix]} layer holds a {dtype} {shape} parameter: "
                                                 f"a dequantized copy of its weight")


def check_engine(directory: Path, manifest, tp: int, dtype: str, rep, ep: int = 1) -> dict:
    """Appends findings to rep; returns a summary for the report. TP=1, then TP=tp with EP=ep."""
    summary = {"engine": "sglang", "dtype": dtype, "runs": []}
    for size in sorted({1, tp}):
        ep_size = ep if size == tp else 1
        results = run_ranks(directory, size, dtype, ep_size, shim=manifest.layout != CT_LAYOUT)
        for rank, r in enumerate(results):
            label = f"tp={size}{f' ep={ep_size}' if ep_size > 1 else ''} rank {rank}"
            compare(manifest, r, label, rep)
            summary["runs"].append({"tp": size, "ep": ep_size, "rank": rank, "error": r.get("error"),
                                    "layers": len(r.get("methods", {})), "parameters": len(r.get("params", {})),
                                    "min_capability": r.get("min_capability"), "act_dtypes": r.get("act_dtypes")})
        if size == 1 and any("error" in r for r in results):
            break  # the same refusal would repeat on every rank
    return summary
