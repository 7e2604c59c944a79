"""Reference dequantization of any module of any checkpoint, through its format module (one place for the math)."""
from __future__ import annotations

from pathlib import Path

from .checkpoint import Checkpoint
from .errors import UserError
from .formats import FORMATS, Scheme
from .safetensors_io import load_tensor


def dequantize(scheme: Scheme, tensors: dict, out_f: int, in_f: int):
    """tensors: suffix → TensorInfo. Returns float32 [out, in]."""
    loaded = {s: load_tensor(t) for s, t in tensors.items() if s != "bias"}
    return FORMATS[scheme.format].dequantize(loaded, scheme.params, out_f, in_f)


def dequantize_from_manifest(ck: Checkpoint, module):
    """A module of a converted directory, as its manifest entry describes it: a ModuleEntry, or its JSON with the
    scheme written in ("format", "params": tests/helpers.manifest_json)."""
    if isinstance(module, dict):
        tensors = {s: ck.tensors[t["name"]] for s, t in module["tensors"].items()}
        return dequantize(Scheme.of(module["format"], **module["params"]), tensors, *module["shape"])
    tensors = {s: ck.tensors[t.name] for s, t in module.tensors.items()}
    return dequantize(module.scheme, tensors, *module.shape)


def rel_error(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def token_kl(base_logp, logp, base_p=None):
    """KL(base ‖ model) of each position's next-token distribution, from log-probabilities [..., vocab] — the one
    definition plan's measurements, its evaluation and verify --text share. base_p: base_logp.exp(), when the caller
    keeps it across many calls."""
    return ((base_logp.exp() if base_p is None else base_p) * (base_logp - logp)).sum(-1)


def kl_mean(total: float, n: int = 1) -> float:
    """A mean KL from a sum over n positions, never below 0: it is ≥ 0 by definition, but two near-equal distributions
    in float32 can sum to -1e-9, which reports printed as -0.000000."""
    return max(total / n, 0.0)


def tokenizer_dir(option: str, dirs: list[Path]) -> Path:
    """Where a measuring option's text is tokenized from: the first of dirs with a tokenizer (verify --text: the
    converted directory, as served, then the base; plan --calib: Recipe.tokenizer_dirs). Asked before any model is
    loaded; one line when none has one (transformers raised from deep inside)."""
    from .checkpoint import TOKENIZER_FILES, has_tokenizer

    for d in dirs:
        if has_tokenizer(Path(d)):
            return Path(d)
    raise UserError(f"{option}: nothing to tokenize the text with — no tokenizer ({', '.join(TOKENIZER_FILES)}) in "
                    f"{' or '.join(map(str, dirs))}; put the model's tokenizer files in the base")


def load_tokenizer(option: str, dirs: list[Path]):
    from transformers import AutoTokenizer

    d = tokenizer_dir(option, dirs)
    try:
        return AutoTokenizer.from_pretrained(d)
    except Exception as e:  # noqa: BLE001 — a broken tokenizer file fails in many ways, all the same here
        why = " ".join(str(e).split())[:200] or type(e).__name__
        raise UserError(f"{option}: the tokenizer in {d} cannot be loaded ({why}); restore its tokenizer files") \
            from None


def read_text(option: str, path) -> str:
    """The text a measuring option names (plan's --calib, verify's --text): UTF-8, whatever the locale; else one line
    saying what the path is instead."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{option} {path}: no such file; give a UTF-8 text file") from None
    except IsADirectoryError:
        raise UserError(f"{option} {path}: is a directory; give a UTF-8 text file") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{option} {path}: cannot read it as UTF-8 text ({e.reason} at byte {e.start}); give a UTF-8 "
                        f"text file") from None
    except OSError as e:
        raise UserError(f"{option} {path}: cannot read it ({e.strerror}); check the path and permissions") from None
