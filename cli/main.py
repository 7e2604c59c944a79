"""The `mpconvert` command line: build, inspect, demo. Errors in input: one line on stderr, exit 2."""
from __future__ import annotations

import atexit
import gc
import inspect as pyinspect
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import NoReturn, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn
from rich.table import Table

from mpconvert.errors import UserError, and_more, file_failed, path_too_long

app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode=None, pretty_exceptions_enable=False,
                  help="Merge quantized checkpoints of one model (FP8, GPTQ, AWQ, W8A8-Int8) into one "
                       "mixed-precision checkpoint with a manifest.\n\n"
                       "Examples:\n\n"
                       "  mpconvert plan sources.yaml --budget 5.5bpw --calib text.txt -o recipe.yaml\n\n"
                       "  mpconvert build recipe.yaml -o out/\n\n"
                       "  mpconvert inspect out/\n\n"
                       "  mpconvert verify out/ --engine sglang --tp 2\n\n"
                       "  mpconvert serve out/ -- --tp 2\n\n"
                       "  mpconvert demo demo-out/")
READER_GONE = 141  # 128 + SIGPIPE: what a shell reports for a program ended by writing to a closed pipe
OUTPUT_LOST = 2  # standard output could not be written (a full disk behind `> report.json`)


def _silence(stream) -> None:
    """Later writes to `stream`, and the text still buffered for it, go nowhere."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, stream.fileno())
    except (OSError, ValueError):
        pass


def _output_lost(e: OSError) -> int:
    """Standard output could not be written: the exit code, after one line on stderr — never exit 0 with a report cut
    short (`mpconvert verify out/ --json > report.json` on a full disk), never an internal error."""
    _silence(sys.stdout)
    err.print(f"error: could not write to standard output ({e.strerror or e}); what it received is incomplete — free "
              f"space or send it elsewhere", markup=False, highlight=False, soft_wrap=True)
    return OUTPUT_LOST


class _CheckedStream:
    """sys.stdout or sys.stderr as main() installs them: the one place where a failed write is decided, whoever
    wrote (rich, print, click's help). A reader that left either stream (`mpconvert inspect out/ | head`) stops the
    command quietly with exit 141, as a program ended by SIGPIPE — not rich's and click's 1, which verify uses for
    problems found. Standard output that cannot be written otherwise ends the command (_output_lost). Standard error
    is diagnostics: a full disk or an I/O error there only silences it — the command goes on, its exit code stands."""

    def __init__(self, stream, is_stdout: bool):
        self._stream, self._is_stdout = stream, is_stdout

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except OSError as e:
            return self._failed(e, len(text))

    def flush(self) -> None:
        try:
            self._stream.flush()
        except OSError as e:
            self._failed(e, 0)

    def _failed(self, e: OSError, n: int) -> int:
        if isinstance(e, BrokenPipeError):
            _silence(self._stream)
            raise SystemExit(READER_GONE) from None
        if self._is_stdout:
            raise SystemExit(_output_lost(e)) from None
        _silence(self._stream)
        return n

    def __getattr__(self, name):  # isatty, fileno, encoding, buffer, …: the stream's own
        return getattr(self._stream, name)


err = Console(stderr=True)
out = Console()

BUILD_HELP = """Merge the checkpoints named by RECIPE into one sharded safetensors checkpoint with a manifest.

Tensors are copied byte-exact (never re-quantized or dequantized), streamed with bounded memory into a temporary
directory beside OUTPUT that is renamed into place only when complete. Every input is checked before a byte is
written (strict safetensors headers, typed configs, scale and g_idx values, fused units, folded scales, SGLang's
TP/EP splits and kernel shapes); each problem is one `error:` line and exit code 2. One build per OUTPUT at a time
(a lock); an existing OUTPUT is replaced only with --force, only if it is an earlier output of build (or empty),
and only the directory that was there when the build started; leftovers of a build that died are cleaned up by the
next build of the same OUTPUT. It ends by listing what each rule chose: its linear modules, their layers and formats
(all rules under --json's `rules`; `inspect` shows the same later).

Recipe (YAML; relative paths are relative to the recipe file):

\b
  base: ./llama-bf16        # bf16 model: config, tokenizer, norms, embeddings
  sources: {fp8: ./llama-fp8, gptq: ./llama-gptq}
  default: gptq             # source of linears no rule matches ("base" = bf16)
  rules:                    # ordered, first match wins; matching nothing = error
    - {match: "*.self_attn.*", layers: "0-1", source: fp8}
    - {match: "mlp.down_proj", moe: false, source: base}
    - {match: "mlp.experts.*", experts: {file: routing.json, top: 8}, source: fp8}
  output: {shard_size: 5GB}

match: a glob on module names (a suffix glob matches too) or "re:REGEX", or a list; layers: 3, "0-5", "0-3,7";
moe: true/false restricts to layers with/without a MoE block; experts: routed expert ids ("0-3", [1, 5]) or
{file: F, top: N | coverage: 0.8}, each layer's most routed experts from a routing-frequency file (JSON
{"LAYER": [count per expert]} or SGLang's expert-distribution dump). Experts of one MoE layer may come in several
formats (FP8, Int8, GPTQ, bf16; not from a folded-scale source such as AWQ): SGLang then runs one native fused-MoE
call per format over its own experts. The YAML is read as written: a key twice in one mapping, a number YAML 1.1
reads otherwise (010 is octal 8; 0x1A, 1_0, 1:20) and yes/no/on/off (booleans there: quote them) are refused.

--to compressed-tensors writes the mix as an ordinary compressed-tensors checkpoint instead, which stock SGLang
serves with no mpconvert installed (vLLM reads the same format; not tested here): one config group per scheme,
explicit module targets, `ignore` for bf16 modules; GPTQ and AWQ repacked losslessly into pack-quantized, each
repacked module proven equal to its source. Refused there: experts of several formats in one MoE layer, int8
experts, a quantized lm_head; Llama and Qwen3-MoE only (what is tested).

Examples:

\b
  mpconvert build recipe.yaml -o out/ --tp 2
  mpconvert build recipe.yaml -o out/ --tp 8 --ep 8 --force --json
  mpconvert build recipe.yaml -o out/ --tp 8 --ep 8 --dp 8      # DP attention: attention over tp/dp ranks
  mpconvert build recipe.yaml -o out/ --tp 8 --dp 8 --moe-dense-tp-size 1   # DeepSeek's dense MLPs whole
  mpconvert build recipe.yaml -o out-ct/ --to compressed-tensors
"""


# SGLang's --moe-dense-tp-size, for build, plan and verify alike
_DENSE_TP_HELP = ("SGLang's --moe-dense-tp-size: 1 keeps DeepSeek's dense MLP layers whole on every rank (SGLang "
                  "takes 1 or the --tp size; other models ignore it)")


def _dense_tp_option():
    return typer.Option(None, "--moe-dense-tp-size", help=_DENSE_TP_HELP)


def _run_command(command, **given):
    """A command run from another (demo), every option not given at its CLI default: called directly, a typer
    command gets the OptionInfo objects of the options left out (an option added to build broke demo that way)."""
    defaults = {name: p.default.default for name, p in pyinspect.signature(command).parameters.items()
                if name not in given and isinstance(p.default, typer.models.ParameterInfo)}
    return command(**defaults, **given)


def _path(value: str) -> Path:
    """Every path argument and option: an empty one ("", `-o ""`) would be the current directory — refused here
    instead of reported as `. already exists` or acted on."""
    if not value.strip():
        raise typer.BadParameter("an empty path (it would mean the current directory); give a path")
    too_long = path_too_long(value)
    if too_long:
        raise typer.BadParameter(f"{too_long}; give a shorter path")
    return Path(value)


def _fail(e: UserError) -> None:
    err.print(f"error: {e}", markup=False, highlight=False, soft_wrap=True)
    raise typer.Exit(e.exit_code)


INTERNAL_ERROR = 70  # EX_SOFTWARE


def guarded(command):
    """Every command: a UserError is one `error:` line and exit 2; anything unexpected is one `internal error:` line
    naming a log file with the traceback, and exit 70 — a traceback never reaches the terminal."""
    import functools

    @functools.wraps(command)
    def run(*args, **kwargs):
        # A DeepSeek-V3-sized job holds millions of long-lived objects (headers, manifest); the cyclic collector's
        # default thresholds re-traverse them over and over (verify --fast 7.5 s → 5.1 s at 171k tensors with these;
        # docs/benchmarks.md). Cycles are still collected, only less often.
        gc.set_threshold(50_000, 50, 100)
        try:
            return command(*args, **kwargs)
        except UserError as e:
            _fail(e)
        except KeyboardInterrupt as e:  # said here: typer would turn it into a silent exit 130
            raise typer.Exit(_stopped(e))
        except (typer.Exit, typer.Abort, SystemExit):
            raise
        except OSError as e:
            if e.filename is None:  # nothing to name: not a file that changed underfoot
                _internal_error(e)
            _fail(file_failed(e))
        except Exception as e:  # noqa: BLE001 — the point of the guard
            _internal_error(e)
    return run


def _internal_error(e: BaseException) -> NoReturn:
    log = _write_crash_log()
    err.print(f"internal error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} — please "
              f"report it; details in {log}", markup=False, highlight=False, soft_wrap=True)
    raise typer.Exit(INTERNAL_ERROR)


class Terminated(KeyboardInterrupt):
    """SIGTERM (a CI time-out, `timeout`, a container stopping) or SIGHUP (the terminal closed), taken as Ctrl-C is
    (main installs on_signal where the signal's action is the default): the build's temporary directory and lock
    removed, one line, exit 128 + the signal. By default Python ended at once and left them."""

    def __init__(self, signum: int = signal.SIGTERM):
        super().__init__(signum)
        self.signum = signum


def on_signal(signum, frame) -> None:
    raise Terminated(signum)


def _stopped(e: KeyboardInterrupt) -> int:
    """Say that the command was stopped; its exit code (128 + the signal, as a shell reports it)."""
    if isinstance(e, Terminated):
        err.print(f"terminated ({signal.Signals(e.signum).name}); nothing was written")
        return 128 + e.signum
    err.print("interrupted; nothing was written")
    return 128 + signal.SIGINT


def _write_crash_log() -> str:
    import os
    import tempfile
    import traceback

    text = traceback.format_exc()
    for d in (os.environ.get("MPCONVERT_CACHE"), str(Path.home() / ".cache" / "mpconvert"), tempfile.gettempdir()):
        if not d:
            continue
        try:
            logs = Path(d) / "logs"
            logs.mkdir(parents=True, exist_ok=True)
            f = logs / f"crash-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
            # (an argument that is not UTF-8 holds surrogates, which strict UTF-8 refuses: the log failed, and
            # its traceback reached the terminal)
            f.write_text(" ".join(sys.argv) + "\n\n" + text, errors="backslashreplace")
            return str(f)
        except OSError:
            continue
    return "(no writable log directory)"


def _bar_console(json_mode: bool) -> Console:
    """Where a progress bar draws: stderr, and nowhere with --json (a disabled bar still ends with a newline)."""
    return Console(stderr=True, quiet=True) if json_mode else err


def _progress(json_mode: bool) -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                    TimeRemainingColumn(), console=_bar_console(json_mode), disable=json_mode)


@app.command(help=BUILD_HELP)
@guarded
def build(recipe: Path = typer.Argument(..., parser=_path, help="recipe YAML"),
          output: Path = typer.Option(..., "-o", "--output",
                                      parser=_path, help="output directory (must not exist, see --force)"),
          tp: int = typer.Option(1, "--tp", help="check every split SGLang makes at this tensor-parallel size"),
          ep: int = typer.Option(1, "--ep", help="expert-parallel size (experts over EP ranks, their intermediate "
                                                 "size over tp/ep), as SGLang's --ep"),
          dp: int = typer.Option(1, "--dp", help="DP attention, as SGLang's --enable-dp-attention --dp N: attention "
                                                 "split over tp/N ranks, the rest as without it (DeepSeek-V2/V3, "
                                                 "Qwen3, Qwen2-MoE, Qwen3-MoE)"),
          dense_tp: Optional[int] = _dense_tp_option(),
          shard_size: Optional[str] = typer.Option(None, "--shard-size", help="max shard size, e.g. 5GB (default: "
                                                   "recipe output.shard_size or 5GB)"),
          force: bool = typer.Option(False, "--force", help="replace an earlier output of build at OUTPUT (or an "
                                                            "empty directory; anything else is refused)"),
          to: str = typer.Option("mpconvert", "--to", help="layout: mpconvert (served through the runtime shim) "
                                                            "or compressed-tensors (stock SGLang, no plugin)"),
          json_out: bool = typer.Option(False, "--json", help="print a JSON summary on stdout")):
    import os

    from mpconvert.collector import paused_then_kept
    from mpconvert.rules import Parallel
    from mpconvert.plan import make_plan
    from mpconvert.recipe import load_recipe, parse_size
    from mpconvert.safety import OutputLock
    from mpconvert.writer import check_output, write
    from mpconvert.manifest import as_json
    from mpconvert.summary import by_rule, rule_lines

    check_output(output, force)
    r = load_recipe(recipe)
    try:
        cap = parse_size(shard_size or r.output.shard_size or "5GB")
    except UserError as e:
        raise UserError(f"{'--shard-size' if shard_size else f'{recipe}: output.shard_size'}: {e}") from None
    t0 = time.perf_counter()
    with OutputLock(Path(os.path.abspath(output))) as lock:
        for line in lock.recovered:
            err.print(f"note: {line}", markup=False, highlight=False, soft_wrap=True)
        # The plan lives to the end of the command: kept out of the collector's traversals (collector.py; writing
        # re-traversed it too: 171k tensors 2.3 → 2.0 s). Planning leaves almost no cyclic garbage to keep frozen (68
        # objects at 171k tensors).
        with paused_then_kept() as keep:
            plan = make_plan(r, Parallel(tp, ep, dp, dense_tp), to)
            keep()
            check_output(output, force, plan)
            if not json_out:
                for label, src in sorted(plan.sources.items()):
                    err.print(f"{label}: {src.describe()}", markup=False, highlight=False)
                if plan.side_note:
                    err.print(plan.side_note, markup=False, highlight=False, soft_wrap=True)
            with _progress(json_out) as prog:
                task = prog.add_task("writing", total=plan.total_bytes)
                manifest = write(plan, output, cap, force, lambda n: prog.advance(task, n), lock)
    secs = time.perf_counter() - t0
    rules = by_rule(manifest.modules)
    summary = {"output": str(output), "layout": plan.layout, "seconds": round(secs, 3), "tensors": len(plan.tensors),
               "bytes": plan.total_bytes, "totals": as_json(manifest.totals),
               "units": {u: v.describe() for u, v in manifest.units.items()}, "rules": rules,
               "notes": [plan.side_note] if plan.side_note else []}
    if json_out:
        print(json.dumps(summary, indent=1, sort_keys=True))
    else:
        t = manifest.totals
        out.print(f"built {output}: {len(plan.tensors)} tensors, {plan.total_bytes / 1e6:.1f} MB, "
                  f"{t.bits_per_weight} bits/weight in linears, {secs:.1f} s", highlight=False)
        for line in rule_lines(rules):
            out.print("  " + line, markup=False, highlight=False, soft_wrap=True)


PLAN_HELP = """Choose which source serves each layer under a size budget, from measurements on real text, and
write a recipe that `mpconvert build` takes unchanged.

For every unit SGLang fuses (qkv, o, gate_up, down, a MoE layer's experts) and every source that can serve it at
--tp/--ep (the build rules: one scheme per unit, splits, kernel shapes), plan measures the KL of the next-token
distribution against the base when only that unit comes from that source (calibration text, the base's own
hidden states, reference dequantizers; GPU when present). It then minimises the summed KL under the budget (convex
hull + greedy by KL saved per byte; folded-scale sources such as AWQ serve their coupled units together) and writes
the recipe (each rule commented with its bytes and predicted ΔKL) and a JSON report beside it. On a MoE model the
per-expert recipe is measured whole on the calibration text beside the per-layer recipe of the same budget (one-expert
costs need not add up) and the lower KL wins (report: joint_check). DeepSeek-V3's multi-token-prediction layer is
left out (`mtp: drop`): it serves speculative decoding only, which next-token KL cannot measure.

SOURCES is a recipe without rules:

\b
  base: ./smollm2-bf16
  sources: {fp8: ./smollm2-fp8-dynamic, int8: ./smollm2-w8a8, gptq: ./smollm2-gptq-g64}

--budget: bytes of the whole model (120MB, 3.5GB), bits per weight over the linears (5.5bpw) or a fraction of the
bf16 model (0.4x); repeat it for several recipes from one measurement (recipe-1.yaml, …).

Examples:

\b
  mpconvert plan sources.yaml --budget 5.5bpw --calib notes.txt -o recipe.yaml
  mpconvert plan sources.yaml --budget 0.35x --budget 0.5x --calib a.txt --frontier frontier.png -o r.yaml
"""


@app.command(help=PLAN_HELP)
@guarded
def plan(sources: Path = typer.Argument(..., parser=_path, help="sources file (a recipe without rules)"),
         budget: list[str] = typer.Option(..., "--budget", help="size budget: 120MB, 5.5bpw or 0.4x (repeatable)"),
         output: Path = typer.Option(..., "-o", "--output",
                                     parser=_path, help="recipe to write (its report: same name, .json)"),
         calib: list[Path] = typer.Option(..., "--calib",
                                          parser=_path, help="calibration text file(s), UTF-8 (repeatable)"),
         tokens: Optional[int] = typer.Option(None, "--calib-tokens", help="calibration tokens to measure on "
                                              "(default 512; per-expert plans of a MoE model: 384 per expert on "
                                              "average, experts / top-k × 384)"),
         tp: int = typer.Option(1, "--tp", help="tensor-parallel size the recipe must build for"),
         ep: int = typer.Option(1, "--ep", help="expert-parallel size the recipe must build for"),
         dp: int = typer.Option(1, "--dp", help="DP attention size the recipe must build for (as build --dp)"),
         dense_tp: Optional[int] = _dense_tp_option(),
         device: Optional[str] = typer.Option(None, "--device", help="torch device for the measurements (default: "
                                                                     "cuda when present, else cpu)"),
         frontier: Optional[Path] = typer.Option(None, "--frontier",
                                                 parser=_path, help="also save the predicted KL-vs-size curve "
                                                                    "as a PNG plot (and print it)"),
         whole_experts: bool = typer.Option(False, "--whole-experts", help="choose one source per MoE layer's "
                                                                           "experts (default: per expert)"),
         force: bool = typer.Option(False, "--force", help="overwrite an existing recipe file"),
         json_out: bool = typer.Option(False, "--json", help="print the report(s) as JSON on stdout")):
    from mpconvert.rules import Parallel
    from mpconvert.autoplan import check_outputs, plot_frontier, prepare, run_plan, write_outputs
    from mpconvert.sensitivity import resolve_device

    if tokens is not None and not 64 <= tokens <= 1_000_000:
        raise UserError(f"--calib-tokens {tokens}: give 64 to 1000000")
    check_outputs(output, len(budget), frontier, force)
    device = resolve_device(device)
    prepared = prepare(sources, budget, calib, tokens, Parallel(tp, ep, dp, dense_tp),
                       per_expert=not whole_experts)  # checks first
    if prepared.short_text:
        err.print(f"warning: {prepared.short_text}", markup=False, highlight=False, soft_wrap=True)
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeRemainingColumn(), console=_bar_console(json_out), disable=json_out) as prog:
        task = prog.add_task("measuring", total=None)
        results = run_plan(prepared, output, device, on_total=lambda n: prog.update(task, total=n),
                           on_step=lambda: prog.advance(task))
    written = write_outputs(results, output, force)
    if frontier is not None:
        plot_frontier(results[0].frontier, results[0].uniform, [(r.report["bytes"], r.report["predicted_kl"])
                                                                for r in results], frontier, force)
    if json_out:
        print(json.dumps({"recipes": [str(p) for p in written], "reports": [r.report for r in results],
                          "frontier": results[0].frontier, "uniform": results[0].uniform}, indent=1, sort_keys=True))
        return
    for p, r in zip(written, results):
        rep = r.report
        out.print(f"{p}: {rep['bytes'] / 1e6:.2f} MB, {rep['bits_per_weight']} bits/weight in linears, predicted "
                  f"KL {rep['predicted_kl']:.5f} (--budget {rep['budget']})", highlight=False)
    if frontier is not None:
        t = Table(title="predicted KL vs size")
        for col in ("", "MB", "predicted KL"):
            t.add_column(col)
        for label, (b, k) in sorted(results[0].uniform.items()):
            t.add_row(f"all {label}", f"{b / 1e6:.2f}", f"{k:.5f}")
        curve = results[0].frontier
        for b, k in [curve[round(i * (len(curve) - 1) / 8)] for i in range(9)]:
            t.add_row("plan", f"{b / 1e6:.2f}", f"{k:.5f}")
        out.print(t)
        out.print(f"plot: {frontier}", highlight=False)


INSPECT_ROWS = 500  # a table of a DeepSeek-V3-sized job's 45k modules helps no one by default


@app.command(help="Show what a converted directory holds: module → format, source, bytes; totals per format; "
                  "what each recipe rule chose; average bits per weight and the size vs bf16.\n\n"
                  "Example:  mpconvert inspect out/ --json")
@guarded
def inspect(directory: Path = typer.Argument(..., parser=_path, help="converted directory"),
            json_out: bool = typer.Option(False, "--json", help="print JSON instead of tables"),
            modules: Optional[bool] = typer.Option(None, "--modules/--no-modules",
                                                   help="list every linear module (default: when there are "
                                                        f"at most {INSPECT_ROWS}, and with --json)")):
    from mpconvert.summary import rule_lines, summarize

    s = summarize(directory, modules is not False)
    if json_out:
        print(json.dumps(s, indent=1, sort_keys=True))
        return
    if modules is None and len(s["modules"]) > INSPECT_ROWS:
        out.print(f"{len(s['modules']):,} linear modules (pass --modules to list them)", highlight=False)
    elif modules is not False:
        t = Table(title=f"{directory} — linear modules")
        for c in ("module", "format", "source", "bytes"):
            t.add_column(c, justify="right" if c == "bytes" else "left")
        for m in s["modules"]:
            t.add_row(m["name"], m["format"], m["source"], f"{m['bytes']:,}")
        out.print(t)
    t = Table(title="totals by format")
    for c in ("format", "modules", "bytes", "bits/weight"):
        t.add_column(c)
    for f, d in sorted(s["by_format"].items()):
        t.add_row(f, str(d["modules"]), f"{d['bytes']:,}", f"{8 * d['bytes'] / d['weights']:.2f}")
    out.print(t)
    for unit, desc in s["units"].items():
        if desc.startswith("mixed_experts"):  # expert → format map of a MoE layer whose experts mix formats
            out.print(f"{unit}: {desc}", highlight=False)
    out.print("chosen by:", highlight=False)
    for line in rule_lines(s["rules"]):
        out.print("  " + line, markup=False, highlight=False, soft_wrap=True)
    out.print(f"linear weights: {s['bits_per_weight']} bits/weight on average; checkpoint {s['bytes']:,} bytes = "
              f"{s['vs_bf16']:.3f} × its bf16 size ({s['bf16_bytes']:,} bytes)", highlight=False)
    out.print("layout: " + ("compressed-tensors (stock SGLang loads it; no plugin)" if s["layout"] ==
                            "compressed-tensors" else "mpconvert (SGLang serves it through the runtime shim)"))


VERIFY_HELP = """Prove that a converted directory is complete, consistent, shardable and faithful.

Checks: structure (index ↔ shards ↔ manifest, every shard header read strictly, dtype/shape, sha256 of every tensor
and a NaN/inf scan of every float tensor unless --fast); the manifest (its schema, and agreeing with itself);
config.json (quantization_config as build wrote it, every other field as recorded at build time, tokenizer files by
sha256); scheme invariants per format (packing shapes, group sizes, positive finite scales, g_idx range, zero
convention), fused units, folded scales and the MLA loader rule; TP/EP splits (DP attention's with --dp,
DeepSeek's dense MLPs at --moe-dense-tp-size) and
kernel shapes for SGLang (at TP=1 too); a memory report (bytes per rank as SGLang splits them; the lm_head over
tp/N ranks with --enable-dp-lm-head). With --numeric --base BASE: every module against what
round-to-nearest in its own scheme does on the base weight, each block and the logits against the bf16 base on CPU,
and with --text FILE perplexity and KL to the base on real text (W8A8 layers' inputs quantized as SGLang's kernels
do: the served model's numbers). With --engine sglang, SGLang's own classes build and load the model on CPU through
the runtime shim (TP=1 and each rank of --tp, with --ep's expert split; not with --dp): every layer must resolve
to its format's native quant method and every parameter must be loaded. A directory built --to compressed-tensors is
checked the same way with SGLang's plugins switched off (stock SGLang must load it), and its config.json against the
compressed-tensors config build wrote.

Exit codes: 0 all checks passed; 1 problems found (one line each; past 50, counts per check); 2 usage error;
70 internal error (one line, the traceback in a log file); 141 the reader of the output left (`| head`).

Examples:

\b
  mpconvert verify out/ --tp 8 --ep 8
  mpconvert verify out/ --tp 8 --ep 8 --dp 8
  mpconvert verify out/ --tp 8 --dp 8 --moe-dense-tp-size 1 --enable-dp-lm-head
  mpconvert verify out/ --numeric --base ./llama-bf16 --text t.txt
  mpconvert verify out/ --engine sglang --tp 2 --json
"""


def _parse_thresholds(items: list[str]) -> dict:
    out: dict = {"module": {}, "block": {}, "cosine": {}}
    for item in items:
        try:
            key, val = item.split("=", 1)
            value = float(val)
            if not value >= 0 or value == float("inf"):
                raise ValueError
            if key in ("kl", "fold"):
                out[key] = value
                continue
            kind, fmt = key.split(".", 1)
            out[{"module": "module", "block": "block", "cosine": "cosine"}[kind]][fmt] = value
        except (ValueError, KeyError):
            raise UserError(f"--threshold {item!r}: use module.FORMAT=ERR, block.FORMAT=ERR, cosine.FORMAT=COS, "
                            f"fold=ERR or kl=NATS with a finite number ≥ 0, e.g. block.gptq=0.3")
    return out


@app.command(help=VERIFY_HELP)
@guarded
def verify(directory: Path = typer.Argument(..., parser=_path, help="converted directory"),
           tp: int = typer.Option(1, "--tp", help="tensor-parallel size to check shardability for"),
           ep: int = typer.Option(1, "--ep", help="expert-parallel size to check for MoE models"),
           dp: int = typer.Option(1, "--dp", help="DP attention size to check for, as SGLang's --enable-dp-attention "
                                                  "--dp N (attention split over tp/N ranks)"),
           dense_tp: Optional[int] = _dense_tp_option(),
           dp_lm_head: bool = typer.Option(False, "--enable-dp-lm-head", help="as SGLang's flag: with --dp, the "
                                           "lm_head split over tp/N ranks like attention (bytes per rank only)"),
           base: Optional[Path] = typer.Option(None, "--base",
                                               parser=_path, help="the bf16 base model (for --numeric)"),
           numeric: bool = typer.Option(False, "--numeric", help="run blocks on CPU vs the base (needs --base)"),
           fast: bool = typer.Option(False, "--fast", help="skip the sha256 and NaN scan of tensor data (said in the "
                                                           "report)"),
           threshold: list[str] = typer.Option([], "--threshold", help="override a band: module.FMT=ERR, "
                                                                       "block.FMT=ERR, cosine.FMT=COS, fold=ERR or "
                                                                       "kl=NATS (repeatable)"),
           engine: Optional[str] = typer.Option(None, "--engine", help="also build the model with this engine's "
                                                "real classes on CPU through the shim and check every layer's "
                                                "quant method (sglang), at TP=1 and at --tp"),
           dtype: str = typer.Option("auto", "--dtype", help="model dtype for --engine (as SGLang's --dtype)"),
           text: Optional[Path] = typer.Option(None, "--text", parser=_path,
                                               help="with --numeric: perplexity of the base and of the converted "
                                                    "model, and their KL, on this text file"),
           json_out: bool = typer.Option(False, "--json", help="print the report as JSON on stdout")):
    from mpconvert.rules import Parallel
    from mpconvert.verify import SUMMARY_ROWS, Progress as VerifyProgress, check_usage, verify as run_verify

    # before the bar: a usage error is one line
    parallel = Parallel(tp, ep, dp, dense_tp, dp_lm_head)
    check_usage(directory, parallel, base, numeric, text, engine)

    thresholds = _parse_thresholds(threshold)
    with Progress(TextColumn("{task.description}"), BarColumn(), TimeRemainingColumn(),
                  console=_bar_console(json_out), disable=json_out) as prog:
        task = prog.add_task("verifying", total=None)

        class Bar(VerifyProgress):
            """Advances rich in batches: one rich call per tensor cost 0.3 s at 171k tensors."""
            pending = 0

            def start(self, total):
                prog.update(task, total=total)

            def step(self, n=1):
                self.pending += n
                if self.pending >= 1024:
                    self.flush()

            def flush(self):
                prog.advance(task, self.pending)
                self.pending = 0

        bar = Bar()
        rep = run_verify(directory, parallel, not fast, base, numeric, thresholds, bar, engine, dtype, text)
        bar.flush()
    if json_out:
        print(json.dumps(rep.to_json(), indent=1, sort_keys=True))
    else:
        if rep.findings:
            t = Table(title=f"{directory}: {len(rep.findings)} problem(s)"
                            + (f", the first {SUMMARY_ROWS} shown" if len(rep.findings) > SUMMARY_ROWS else ""))
            for c in ("check", "where", "problem"):
                t.add_column(c, overflow="fold")
            for f in rep.findings[:SUMMARY_ROWS]:
                t.add_row(f.check, f.where, f.message)
            out.print(t)
            if len(rep.findings) > SUMMARY_ROWS:
                out.print("problems per check: " + ", ".join(f"{k} {v:,}" for k, v in sorted(rep.counts().items()))
                          + " (all of them: --json)", highlight=False)
        if rep.numeric:
            t = Table(title="numeric fidelity vs base (per block: error of the block's contribution)")
            for c in ("block", "formats", "rel. error", "limit"):
                t.add_column(c)
            for b in rep.numeric["blocks"]:
                t.add_row(str(b["layer"]), "+".join(b["formats"]), f"{b['rel_error']:.4f}", str(b["limit"]))
            out.print(t)
            out.print(f"logits cosine {rep.numeric['logits_cosine']:.4f} (limit {rep.numeric['cosine_limit']}), "
                      f"top-1 agreement {rep.numeric['top1_agreement']:.2%}", highlight=False)
            if "text" in rep.numeric:
                x = rep.numeric["text"]
                out.print(f"on {x['file']} ({x['tokens']} tokens): perplexity {x['perplexity']:.3f} vs the base's "
                          f"{x['perplexity_base']:.3f}, KL to the base {x['kl']:.5f}", highlight=False)
        if rep.engine:
            runs = rep.engine["runs"]
            out.print(f"engine sglang (dtype {rep.engine['dtype']}): " + "; ".join(
                f"tp={r['tp']}{' ep=' + str(r['ep']) if r.get('ep', 1) > 1 else ''} rank {r['rank']}: " +
                (f"refused: {r['error']}" if r["error"] else
                 f"{r['layers']} quantized layers, {r['parameters']} parameters")
                for r in runs), highlight=False, soft_wrap=True)
        mem = rep.memory
        if mem:
            out.print(f"memory: {mem['bytes']:,} bytes ({mem['vs_bf16']:.3f} × bf16), {mem['bits_per_weight']} bits/weight"
                      f" in linears, {mem['bytes_per_rank']:,} bytes per rank at {parallel.spelled()}; by format: "
                      + ", ".join(f"{k} {v:,}" for k, v in sorted(mem["by_format"].items()))
                      + (f"; {mem['mtp_bytes']:,} of the bytes are the MTP layer's, loaded only for speculative "
                         f"decoding" if "mtp_bytes" in mem else ""), highlight=False)
        out.print(("OK" if rep.ok else "FAILED") + f": {', '.join(rep.checks)}", highlight=False)
    raise typer.Exit(0 if rep.ok else 1)


SERVE_HELP = """Serve a converted directory with SGLang: runs `python -m sglang.launch_server --model-path DIRECTORY`
plus everything after `--`, in this Python (SGLang and mpconvert installed together, so SGLang finds the runtime shim
through its `sglang.srt.plugins` entry point in every worker).

Adds `--dtype float16` when the model has GPTQ MoE experts and no --dtype is given (SGLang's GPTQ-Marlin MoE kernel
runs fp16 activations only). Refuses, before SGLang starts: a directory without an mpconvert manifest, an
SGLANG_PLUGINS filter that would leave the shim out, a shim that cannot load in the installed SGLang (SGLang would log
it and fail every worker with "Unknown quantization method"), a --model-path of its own among SGLang's arguments, a
directory with no tokenizer unless --tokenizer-path or --skip-tokenizer-init is given, a path that is not UTF-8, a
--quantization (or a draft model's --speculative-draft-model-quantization, read from this directory) other than the
directory's own quant_method (SGLang ignores it, or reads every layer as that method: FP8 bytes into Int8 parameters,
silently), EPLB, redundant experts or an --init-expert-location for a model that mixes formats inside a MoE layer
(the shim's expert groups keep SGLang's default placement), and parallel sizes (--tp, --ep, --dp with
--enable-dp-attention, --moe-dense-tp-size) at which a layer
cannot be split — the checks of `mpconvert verify --tp/--ep/--dp` — and config values set at launch
(--json-model-override-args) that the weights decide: the layers' formats (quantization_config) and any size,
layer or expert count the weights do not have (verify's config rule). A value the weights leave open — a longer
context, rope scaling — goes to SGLang as given: set it here, not by editing config.json (verify reports an edited
config.json).

Examples:

\b
  mpconvert serve out/ --print-command
  mpconvert serve out/ -- --tp 2 --port 30000
  mpconvert serve out/ -- --json-model-override-args '{"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}'
"""


def serve_command(directory: Path, args: list[str]) -> list[str]:
    import os

    from mpconvert.checkpoint import sglang_path_problem
    from mpconvert.manifest import load_manifest

    manifest, _ = load_manifest(directory)
    why = sglang_path_problem(directory)
    if why:
        raise UserError(f"SGLang cannot serve it: {why}; rename it")
    plugins = os.environ.get("SGLANG_PLUGINS")
    if plugins is not None and "mpconvert" not in plugins.split(","):
        raise UserError(f"SGLANG_PLUGINS={plugins!r} leaves out the mpconvert plugin, so SGLang could not read this "
                        f"directory; add mpconvert to it or unset it")
    _check_launch(directory, manifest, args)
    from mpconvert.runtime_shim import load_problem

    problem = load_problem()  # SGLang would log it, start, and fail each worker: "Unknown quantization method"
    if problem:
        raise UserError(f"SGLang could not serve {directory}: {problem}")
    cmd = [sys.executable, "-m", "sglang.launch_server", "--model-path", str(directory), *args]
    gptq_moe = any(u.endswith(".experts") and fmt == "gptq"
                   for u, spec in manifest.units.items() for fmt, _ in spec.schemes())
    if gptq_moe and not any(a == "--dtype" or a.startswith("--dtype=") for a in args):
        cmd += ["--dtype", "float16"]
    return cmd


def _check_launch(directory: Path, manifest, args: list[str]) -> None:
    """What launch_server will run with, read as SGLang reads it (sglang_versions.launch_arguments: `--tp` is
    `--tp-size`, a `--config` file is merged): no model path but the directory's, and every split at its parallel
    sizes one SGLang can load (rules.partition_problems, what verify --tp/--ep/--dp checks) — refused here in seconds,
    not by SGLang while it starts its workers."""
    import shlex

    import yaml

    from mpconvert.rules import Parallel, expert_placement_problem, partition_problems

    def refuse(message: str) -> NoReturn:
        if len(message) > 300:  # "ambiguous option: --enable could match" lists ninety options
            message = message[:300].rsplit(",", 1)[0] + ", …"
        raise UserError(f"SGLang's launch_server refuses the arguments after --: {message}")

    try:
        from mpconvert.runtime_shim.sglang_versions import launch_arguments

        launch = launch_arguments(["--model-path", str(directory), *args], refuse)
    except ImportError as e:
        raise UserError(f"SGLang cannot be imported in this Python ({e}); serve runs it here — install mpconvert with "
                        f"SGLang (make setup)") from None
    except (OSError, ValueError, yaml.YAMLError) as e:  # its --config file
        raise UserError(f"SGLang's launch_server cannot read its --config: {' '.join(str(e).split())}") from None
    if Path(launch.model_path).resolve() != directory.resolve():  # `out/` and `./out` are one model
        raise UserError(f"the arguments after -- name another model ({launch.model_path}); serve passes {directory} "
                        f"as --model-path itself — remove it (to serve another directory, name that one instead)")
    from mpconvert.checkpoint import read_json

    config = read_json(directory / "config.json", "config.json")  # read once for both checks
    _check_config_overrides(directory, manifest, launch, config)
    _check_quantization_flags(directory, launch, config)
    mixed = [u for u, spec in manifest.units.items() if spec.groups]
    moved = expert_placement_problem(mixed[0], launch) if mixed else None
    if moved:
        raise UserError(f"{moved}{and_more(mixed)}")
    _check_tokenizer(directory, launch)
    sizes = Parallel(launch.tp_size, launch.ep_size, launch.dp_size if launch.enable_dp_attention else 1,
                     launch.moe_dense_tp_size, launch.enable_dp_lm_head).check()
    problems = partition_problems(manifest.linears(), manifest.model.info(), sizes)
    if problems:
        first, flags = problems[0], sizes.flags()
        where = "" if first.where == "model" else f"{first.where}: "
        raise UserError(f"{directory} cannot be served with {flags}: {where}{first.message.removeprefix(flags + ': ')}"
                        f"{and_more(problems)}; `mpconvert verify {shlex.quote(str(directory))} {flags}` lists them "
                        f"all")


def _check_tokenizer(directory: Path, launch) -> None:
    """SGLang loads the tokenizer from --tokenizer-path, by default the model's directory; with none there its server
    fails as it starts (transformers: "Couldn't instantiate the backend tokenizer"). Build takes the base's, else a
    source's, and warns when neither has one."""
    from mpconvert.checkpoint import TOKENIZER_FILES, has_tokenizer

    if getattr(launch, "skip_tokenizer_init", False) or launch.tokenizer_path not in (None, str(directory)):
        return
    if not has_tokenizer(directory):
        raise UserError(f"{directory} has no tokenizer ({', '.join(TOKENIZER_FILES)}), and SGLang's server cannot "
                        f"start without one: pass `-- --tokenizer-path DIR` (the model's tokenizer files), or put "
                        f"them in the base and build again")


def _check_quantization_flags(directory: Path, launch, config: dict) -> None:
    """--quantization names the method SGLang reads every layer with, and the weights decide it (config.json's
    quantization_config). SGLang 0.5.17 ignores most other names for an mpconvert directory, but takes `humming` (and,
    for a compressed-tensors export, `w8a8_int8`/`w8a8_fp8`) over the whole model: it then reads an FP8 layer's bytes
    into Int8 parameters with no error (seen on CPU with SGLang's own loader). So only the directory's own method, or
    none; the same for a speculative draft read from this directory."""
    qc = config.get("quantization_config")
    own = qc.get("quant_method") if isinstance(qc, dict) else None
    draft = getattr(launch, "speculative_draft_model_path", None)
    draft_here = draft is None or Path(draft).resolve() == directory.resolve()
    for flag, value in (("--quantization", launch.quantization),
                        ("--speculative-draft-model-quantization",
                         getattr(launch, "speculative_draft_model_quantization", None) if draft_here else None)):
        if value is not None and value != own:
            raise UserError(f"{flag} {value}: {directory}/config.json says how each layer is stored (quant_method "
                            f"{own!r}); SGLang would ignore {value} or read every layer as {value} (an FP8 layer's "
                            f"bytes into Int8 parameters, with no error) — leave {flag} out")


def _check_config_overrides(directory: Path, manifest, launch, config: dict) -> None:
    """SGLang builds the model from config.json with --json-model-override-args set on top (each key set on the
    config; a dict onto a sub-config such as text_config updates it), or from another file (--decrypted-config-file).
    A launch-time value — a longer context, another rope_scaling — is the user's to choose; what the build decided is
    not: the layers' formats (quantization_config) and every size the weights have (verify's config rule,
    layout.config_problems). Refused here as verify refuses them in an edited config.json."""
    from mpconvert.layout import config_problems
    from mpconvert.manifest import WRITTEN_KEYS

    flag = "--json-model-override-args"
    if getattr(launch, "decrypted_config_file", None):
        raise UserError(f"--decrypted-config-file makes SGLang read {launch.decrypted_config_file} instead of "
                        f"{directory}/config.json, which says how each layer is stored; leave it out (pass a value to "
                        f"change with {flag})")
    try:
        override = json.loads(getattr(launch, "json_model_override_args", None) or "{}")
    except ValueError as e:
        raise UserError(f"{flag}: not JSON ({e}); pass one object, e.g. '{{\"max_position_embeddings\": 65536}}'") \
            from None
    if not isinstance(override, dict):
        raise UserError(f"{flag}: {override!r} is not a JSON object; pass one, e.g. "
                        f"'{{\"max_position_embeddings\": 65536}}'")
    for key in override:
        if key in WRITTEN_KEYS:
            raise UserError(f"{flag} sets {key}, which build wrote to say how each layer of {directory} is stored "
                            f"(SGLang would read the weights as something they are not); leave it out")
    seen = dict(config)
    for key, value in override.items():
        current = seen.get(key)
        nested = isinstance(value, dict) and isinstance(current, dict) and "model_type" in current  # a sub-config
        seen[key] = {**current, **value} if nested else value
    problems = config_problems(seen, manifest.weight_shapes(), served=True)
    if problems:
        raise UserError(f"{flag} {json.dumps(override)}: {problems[0]}{and_more(problems)}; override only what the "
                        f"weights leave open (context length, rope scaling)")


@app.command(help=SERVE_HELP, context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
@guarded
def serve(ctx: typer.Context, directory: Path = typer.Argument(..., parser=_path, help="converted directory"),
          print_command: bool = typer.Option(False, "--print-command", help="print the command instead of running it")):
    import os
    import shlex

    cmd = serve_command(directory, list(ctx.args))
    if print_command:
        print(shlex.join(cmd))
        return
    err.print("running: " + shlex.join(cmd), markup=False, highlight=False, soft_wrap=True)
    os.execv(cmd[0], cmd)


@app.command(help="Run the whole job on a built-in demo: make tiny random models, quantize them with the real "
                  "producers (llm-compressor, gptqmodel; needs `make setup`), build a mixed checkpoint, inspect it."
                  "\n\nExample:  mpconvert demo demo-out/")
@guarded
def demo(directory: Path = typer.Argument(Path("demo-out"),
                                          parser=_path, help="where the demo writes its recipe and output"),
         force: bool = typer.Option(True, "--force/--no-force", help="replace an earlier demo output")):
    recipe = _fixture_factory().run_demo(directory, err)
    _run_command(build, recipe=recipe, output=directory / "mixed", force=force)
    _run_command(inspect, directory=directory / "mixed", modules=True)


def _fixture_factory():
    """The repository's fixture factory (fixtures/factory.py): the demo runs from a checkout after `make setup`."""
    import importlib

    import mpconvert

    root = Path(mpconvert.__file__).resolve().parent.parent
    if not (root / "fixtures" / "factory.py").is_file():
        raise UserError("the demo makes its models with the repository's fixture factory: run it from a checkout of "
                        "mpconvert after `make setup`")
    sys.path.insert(0, str(root))
    return importlib.import_module("fixtures.factory")


def main() -> None:
    if sys.stdout is not None and sys.stderr is not None:
        # a character the terminal's encoding lacks (an arrow under PYTHONIOENCODING=ascii or a Latin-1 locale; a
        # path that is not UTF-8 under a UTF-8 locale) is written escaped: strict, it crashed the command mid-report
        for stream in (sys.stdout, sys.stderr):
            if getattr(stream, "errors", None) == "strict" and hasattr(stream, "reconfigure"):
                stream.reconfigure(errors="backslashreplace")
        sys.stdout, sys.stderr = _CheckedStream(sys.stdout, True), _CheckedStream(sys.stderr, False)
    for signum in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(signum) == signal.SIG_DFL:  # (nohup's ignored SIGHUP stays ignored)
            signal.signal(signum, on_signal)
    try:
        app()
    except KeyboardInterrupt as e:
        sys.exit(_stopped(e))
    except SystemExit as e:  # how typer ends every command
        if e.code is None or type(e.code) is int:
            _exit_now(e.code or 0)
        raise


def _exit_now(code: int) -> None:
    """Exit without freeing the interpreter's objects one by one: a DeepSeek-V3-sized job leaves millions (headers,
    manifest), and tearing them down cost 0.15 s of verify's 3.8 s. Only once the command has finished: atexit
    handlers run and output is flushed first (a flush that fails changes a 0 exit code: _CheckedStream), and every
    file it wrote is closed and in place by then. A thread still running (none should be) gets the normal exit,
    which waits for it."""
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except SystemExit as e:  # _CheckedStream decided (141 or 2); a command's own failure code stands
            code = code or e.code
        except (OSError, ValueError):  # a stream main() did not wrap, or a closed one: nothing left to say there
            pass
    if threading.active_count() > 1:
        sys.exit(code)
    os._exit(code)


if __name__ == "__main__":
    main()
