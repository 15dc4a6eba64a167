"""The extraction flow: validated rows → input shards → Ray Data (tokenise on CPU → model actor pool) → store.

``run_extract(cfg)`` is what ``raysafe extract``, ``jobs/extract.py`` and the tests call. It is
resumable: shards already marked done for a model are skipped, so a re-run after a kill extracts only what is
missing and ends with the same data as an uninterrupted run.

``ensure_activations(cfg)`` is the one door of the analyses (separation, concepts, ...): the activations of every
model of ``cfg``, reused only when the store's recorded identity (weights fingerprint, texts fingerprint, the
extraction settings that shape a vector) is the one asked for, and extracted (missing shards resumed, stale ones
recomputed) otherwise. Its :class:`Activations` carries those identities, which the analyses write beside their
outputs.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

from raysafe import tracking
from raysafe.atomic import atomic_write_json, write_inputs
from raysafe.config import ModelSpec, dump_config
from raysafe.data import schemas
from raysafe.data.sources import load_table, to_text_rows
from raysafe.errors import ConfigError, OutputError, remote_errors
from raysafe.extract.config import ExtractConfig, ExtractSpec
from raysafe.extract.store import IDENTITY_FIELDS, ActivationStore, identity_changes, identity_digest
from raysafe.identity import fingerprint
from raysafe.models.layers import config_depth, resolve_layers, text_config

log = logging.getLogger(__name__)

CONTRACTS = {
    "prompt_variants": schemas.PROMPT_VARIANTS,
    "parallel_detox": schemas.PARALLEL_DETOX,
    "concept_pairs": schemas.CONCEPT_PAIRS,
}
FIXTURE_CONTRACTS = {
    "safety_prompts": "prompt_variants",
    "detox_pairs": "parallel_detox",
    "concept_pairs": "concept_pairs",
}


@dataclass
class ModelResult:
    label: str
    shards_total: int
    shards_extracted: int
    rows: int
    tokens: int
    seconds: float
    n_truncated: int

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


@dataclass
class ExtractResult:
    output_dir: Path
    dataset_fingerprint: str
    rows_per_lang: dict[str, int]
    models: dict[str, ModelResult] = field(default_factory=dict)
    mlflow_run_id: str | None = None
    dropped: dict[str, list[str]] = field(default_factory=dict)  # model → changed identity fields (shards redone)

    @property
    def store(self) -> ActivationStore:
        return ActivationStore(self.output_dir)

    def summary(self) -> str:
        lines = [
            f"activations in {self.output_dir}  (dataset {self.dataset_fingerprint}, rows per language "
            f"{self.rows_per_lang})"
        ]
        for m in self.models.values():
            lines.append(
                f"  {m.label}: {m.shards_extracted}/{m.shards_total} shards extracted now, {m.tokens:,} "
                f"tokens, {m.tokens_per_s:,.0f} tokens/s, {m.n_truncated} truncated"
            )
            if m.label in self.dropped:
                lines.append(
                    f"    (stored activations were stale, every shard redone: {'; '.join(self.dropped[m.label])})"
                )
        if self.mlflow_run_id:
            lines.append(f"MLflow run {self.mlflow_run_id}")
        return "\n".join(lines)


def contract_name(cfg: ExtractConfig) -> str:
    if cfg.data.contract != "auto":
        return cfg.data.contract
    if cfg.data.kind == "fixture":
        if cfg.data.name not in FIXTURE_CONTRACTS:
            raise ConfigError(
                f"fixture {cfg.data.name!r} holds no texts to extract",
                where="data.name",
                fix=f"use one of {sorted(FIXTURE_CONTRACTS)}",
            )
        return FIXTURE_CONTRACTS[cfg.data.name]
    return "prompt_variants"


def load_text_rows(cfg: ExtractConfig) -> pl.DataFrame:
    """Validated rows, one text per row (pairs flattened: label 1 = toxic / positive side)."""
    contract = CONTRACTS[contract_name(cfg)]
    return to_text_rows(load_table(cfg.data, contract), contract.name)


def model_info(spec: ModelSpec, cfg: ExtractConfig, dataset_fp: str) -> tuple[dict, list[int]]:
    """The model's identity record for the store (with ``identity``, the digest of its vector-shaping fields), and
    its validated layer list (raises before any work starts)."""
    from raysafe.models.loading import load_hf_config, resolve

    resolved = resolve(spec)
    hf = load_hf_config(spec, resolved)
    text = text_config(hf)
    n_layers = config_depth(hf)
    layers = resolve_layers(cfg.extract.layers, n_layers, spec.label)
    info = {
        "model": spec.label,
        "path": spec.path,
        "revision": spec.revision,
        "fingerprint": resolved.fingerprint,
        "architecture": type(hf).__name__,
        "num_layers": n_layers,
        "hidden_size": int(text.hidden_size),
        "layers": layers,
        "positions": list(cfg.extract.positions),
        "store_dtype": cfg.extract.store_dtype,
        "dtype": compute_dtype(spec, cfg),
        "attn_implementation": spec.attn_implementation,
        "max_length": cfg.extract.max_length,
        "chat_template": cfg.extract.template_identity(spec.label),
        "truncate": cfg.extract.truncate,
        "padding_side": cfg.extract.padding_side,
        "shard_rows": cfg.extract.shard_rows,
        "dataset_fingerprint": dataset_fp,
    }
    info["identity"] = identity_digest(info)
    return info, layers


def check_lengths(spec: ModelSpec, extract: ExtractSpec, rows: pl.DataFrame) -> None:
    """With ``extract.on_overflow=error``: tokenise every text on the driver, as the tokenising stage will, and raise
    the DataError naming the first text over ``extract.max_length`` before any Ray worker starts."""
    from raysafe.extract.stages import tokenize_texts
    from raysafe.models.loading import load_tokenizer, resolve

    tok = load_tokenizer(spec, resolve(spec))
    meta = rows.select([c for c in ("row_id", "group_id", "lang") if c in rows.columns]).to_arrow()
    tokenize_texts(tok, rows["text"].to_list(), extract, meta)


def compute_dtype(spec: ModelSpec, cfg: ExtractConfig) -> str:
    """The dtype the model actors compute in: the spec's, or for ``auto`` bfloat16 on GPU actors, float32 on CPU."""
    if spec.dtype != "auto":
        return spec.dtype
    return "bfloat16" if cfg.ray.num_gpus_per_actor > 0 else "float32"


def _actor_threads(cfg: ExtractConfig) -> int | None:
    if cfg.ray.torch_threads:
        return cfg.ray.torch_threads
    return max(1, int(cfg.ray.num_cpus_per_actor))


def extract_model(
    cfg: ExtractConfig,
    spec: ModelSpec,
    layers: list[int],
    store: ActivationStore,
    missing: list[int],
    identity: str,
    progress: bool = True,
    mlflow: dict | None = None,
) -> list[dict]:
    """Run the Ray Data pipeline over the ``missing`` shards of one model; returns one summary per shard.
    ``mlflow``: :func:`raysafe.tracking.attach_info` of the run each model actor samples its system metrics into
    (``system/extract-<host>-<pid>/…``: the GPUs the actors use are on other nodes than the driver)."""
    import ray
    from tqdm.auto import tqdm

    from raysafe.extract.stages import ExtractorStage, TokenizeStage
    from raysafe.runtime import actor_remote_args, ensure_ray, quiet_ray_data

    ensure_ray(cfg.ray)
    quiet_ray_data()
    model_kw = spec.model_dump()
    extract_kw = cfg.extract.model_dump()
    ds = ray.data.from_items([{"shard_id": k} for k in missing], override_num_blocks=len(missing))
    ds = ds.map_batches(
        TokenizeStage,
        fn_constructor_kwargs={"model": model_kw, "extract": extract_kw, "store_root": str(store.root)},
        batch_size=1,
        num_cpus=cfg.ray.tokenize_cpus,
        compute=ray.data.ActorPoolStrategy(size=1),
    )
    ds = ds.map_batches(
        ExtractorStage,
        fn_constructor_kwargs={
            "model": model_kw,
            "extract": extract_kw,
            "layers": layers,
            "store_root": str(store.root),
            "model_label": spec.label,
            "identity": identity,
            "torch_threads": _actor_threads(cfg),
            "mlflow": mlflow,
        },
        batch_size=1,
        num_gpus=cfg.ray.num_gpus_per_actor or None,
        num_cpus=cfg.ray.num_cpus_per_actor,
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=cfg.ray.num_actors),
        **actor_remote_args(cfg.ray),
    )
    summaries = []
    with (
        remote_errors(),
        tqdm(total=len(missing), desc=f"extract {spec.label}", unit="shard", disable=not progress) as bar,
    ):
        for row in ds.iter_rows():
            summaries.append(row)
            bar.update(1)
            bar.set_postfix(tok_s=f"{row['tokens'] / max(row['seconds'], 1e-9):,.0f}")
    return summaries


def last_token_states(
    model_path: str,
    texts: list[str],
    layer: int,
    max_length: int,
    chat_template: str = "auto",
    device: str = "cpu",
    torch_threads: int | None = None,
):
    """``[len(texts), hidden]`` float32 states of the last token at ``layer`` of the model at ``model_path``, in a
    plain loop in this process (no Ray, no store): how another flow measures a few prompts. ``chat_template``:
    ``on`` | ``off`` | ``auto`` (on when the tokenizer has one)."""
    import numpy as np

    from raysafe.extract.config import ExtractSpec
    from raysafe.extract.stages import Extractor, tokenize_texts

    probe = ExtractSpec(layers=[layer], positions=["last"], max_length=max_length)
    ex = Extractor(
        {"path": model_path, "dtype": "float32" if device == "cpu" else "auto"},
        probe.model_dump(),
        [layer],
        device=device,
        torch_threads=torch_threads,
    )
    use_template = {"on": True, "off": False}.get(chat_template, bool(getattr(ex.tok, "chat_template", None)))
    spec = ExtractSpec(layers=[layer], positions=["last"], max_length=max_length, chat_template=use_template)
    ids, _ = tokenize_texts(ex.tok, texts, spec)
    return np.asarray(ex.extract(ids)[(layer, "last")])


def run_extract(cfg: ExtractConfig, progress: bool = True) -> ExtractResult:
    """Extract pooled hidden states of every model in ``cfg`` for every row of ``cfg.data``."""
    rows = load_text_rows(cfg)
    fp = fingerprint(rows)
    store = ActivationStore(cfg.output_dir)
    # Validate every model (paths, layers, output ownership) before any extraction starts.
    plans = []
    for spec in cfg.models:
        info, layers = model_info(spec, cfg, fp)
        if cfg.extract.on_overflow == "error":
            check_lengths(spec, cfg.extract, rows)
        plans.append((spec, info, layers))
    n_shards = write_inputs(store.inputs_dir, rows, cfg.extract.shard_rows, fp, "texts")
    dropped = {spec.label: changed for spec, info, _ in plans if (changed := store.claim(spec.label, info))}
    rows_per_lang = dict(sorted(Counter(rows["lang"].to_list()).items()))
    result = ExtractResult(Path(cfg.output_dir), fp, rows_per_lang, dropped=dropped)
    with tracking.run(cfg.tracking, "extract", tags={"raysafe.flow": "extract"}) as mlrun:
        tracking.log_params({"config": cfg.model_dump(mode="json"), "dataset_fingerprint": fp})
        name = f"{cfg.data.name or cfg.data.path} ({contract_name(cfg)})"
        tracking.log_input(name, {"data": cfg.data}, fp, rows.height, context="extraction")
        tracking.log_models_lineage(cfg.models)  # the training run and identity of a raysafe checkpoint
        tracking.log_metrics({f"rows_{lang}": n for lang, n in rows_per_lang.items()})
        for spec, info, layers in plans:
            done = store.done_shards(spec.label)
            missing = [k for k in range(n_shards) if k not in done]
            t0 = time.perf_counter()
            metrics_into = tracking.attach_info(cfg.tracking, mlrun) if cfg.tracking.log_system_metrics else None
            summaries = (
                extract_model(cfg, spec, layers, store, missing, info["identity"], progress, metrics_into)
                if missing
                else []
            )
            wall = time.perf_counter() - t0
            tokens = sum(int(s["tokens"]) for s in summaries)
            mr = ModelResult(
                spec.label,
                n_shards,
                len(missing),
                sum(int(s["rows"]) for s in summaries),
                tokens,
                wall,
                sum(int(s["n_truncated"]) for s in summaries),
            )
            result.models[spec.label] = mr
            if mr.n_truncated:
                log.warning("%s: %d text(s) truncated to %d tokens", spec.label, mr.n_truncated, cfg.extract.max_length)
            tracking.log_metrics(
                {
                    f"{spec.label}.tokens_per_s": mr.tokens_per_s,
                    f"{spec.label}.seconds": wall,
                    f"{spec.label}.shards_extracted": len(missing),
                    f"{spec.label}.n_truncated": mr.n_truncated,
                }
            )
            if store.done_shards(spec.label) != set(range(n_shards)):
                raise OutputError(
                    f"extraction of {spec.label} ended with shards missing",
                    where=str(store.model_dir(spec.label)),
                    fix="re-run the same command: it resumes from the shards already written",
                )
        manifest = {
            "dataset_fingerprint": fp,
            "rows": rows.height,
            "rows_per_lang": rows_per_lang,
            "shards": n_shards,
            # the models extracted into this store by earlier runs stay listed (each run may extract a few)
            "models": {m: store.stored_info(m) for m in store.models()} | {s.label: i for s, i, _ in plans},
            "source": cfg.data.model_dump(mode="json"),
        }
        atomic_write_json(store.root / "manifest.json", manifest)
        (store.root / "config.yaml").write_text(dump_config(cfg), encoding="utf-8")
        if mlrun is not None:
            tracking.log_params({"output_dir": str(Path(cfg.output_dir).resolve())})
            tracking.log_artifact(store.root / "manifest.json")
            tracking.log_artifact(store.root / "config.yaml")
            result.mlflow_run_id = mlrun.info.run_id
    return result


# ------------------------------------------------------------------------------------ the analyses' one door
#: Identity fields that make stored vectors wrong when they differ (layers and positions only make some missing).
VECTOR_FIELDS = tuple(k for k in IDENTITY_FIELDS if k not in ("layers", "positions"))


@dataclass
class Activations:
    """The activations an analysis reads: the store, and per model the identity of what it holds."""

    store: ActivationStore
    identities: dict[str, dict]  # model → activations digest, weights and texts fingerprints, layers, positions
    extracted: list[str] = field(default_factory=list)  # models extracted (resumed or redone) by this call
    mlflow_run_ids: list[str] = field(default_factory=list)

    def record(self) -> dict:
        """What the analysis outputs carry: the store and each model's identity."""
        return {"store": str(self.store.root.resolve()), "models": self.identities}

    def log_inputs(self, kind: str) -> None:
        """Each model's stored activations as a dataset input of the active MLflow run: the store, the weights and
        texts fingerprints they were made from, their layers and positions; digest = their identity."""
        root = str(self.store.root.resolve())
        for label, ident in self.identities.items():
            source = {"store": root, "model": label} | {
                k: ident[k] for k in ("weights", "texts", "layers", "positions")
            }
            tracking.log_dataset(f"{kind} activations of {label}", source, ident["activations"], None, "analysis")

    def params(self, prefix: str) -> dict[str, str]:
        """Flat MLflow params: ``<prefix>.<model>.activations`` / ``.weights`` / ``.texts``."""
        out = {}
        for label, ident in self.identities.items():
            for k in ("activations", "weights", "texts"):
                out[f"{prefix}.{label}.{k}"] = ident[k]
        return out


def identity_record(info: dict) -> dict:
    """The identity of one model's stored activations, from its ``model.json``."""
    return {
        "activations": info["identity"],
        "weights": info["fingerprint"],
        "texts": info["dataset_fingerprint"],
        "layers": list(info["layers"]),
        "positions": list(info["positions"]),
        "path": info["path"],
    }


def ensure_activations(
    cfg: ExtractConfig,
    *,
    need_layers: list[int] | None = None,
    extract_if_missing: bool = True,
    progress: bool = True,
    shutdown_ray: bool = False,
    what: str = "activations",
) -> Activations:
    """The activations of every model of ``cfg`` in ``cfg.output_dir``, extracted first where the store cannot serve
    them as they are. A model's stored activations are reused only when its identity matches what ``cfg`` asks for
    now — the weights' content fingerprint, the texts' fingerprint and every extraction setting that shapes a vector
    (:data:`~raysafe.extract.store.IDENTITY_FIELDS`) — and they cover the layers (``need_layers``, default the
    extraction's) and positions; otherwise:

    - stale (another fingerprint or setting): every shard of that model is extracted again;
    - layers or positions missing: the model is extracted again with the union of the stored and the asked ones;
    - shards missing (a killed run): the extraction resumes with the stored settings.

    Texts other than those the store was extracted from cannot be redone in place (the other models' activations
    in the store come from them): that is an OutputError naming both fingerprints. With ``extract_if_missing``
    false, any of the above is an OutputError listing what is missing or stale, model by model."""
    import math

    store = ActivationStore(cfg.output_dir)
    if store.inputs() is None and not extract_if_missing:
        raise OutputError(
            f"the {what} are incomplete: no activations at {store.root}",
            where=str(store.root),
            fix="set extract_if_missing: true, or run `raysafe extract` with the same models and data",
        )
    rows = load_text_rows(cfg)
    fp = fingerprint(rows)
    inputs = store.inputs()
    if inputs is not None and (inputs["fingerprint"], inputs["shard_rows"]) != (fp, cfg.extract.shard_rows):
        raise OutputError(
            f"the {what} in {store.root} were extracted from other texts or shards (texts fingerprint "
            f"{inputs['fingerprint']}, shard_rows {inputs['shard_rows']}; now {fp}, {cfg.extract.shard_rows}); "
            "re-extracting in place would discard the other models' activations of those texts",
            where=str(store.inputs_dir / "_dataset.json"),
            fix="give these texts their own activations directory, or delete that one to extract again",
        )
    n_shards = max(1, math.ceil(rows.height / cfg.extract.shard_rows))
    gaps: list[str] = []
    runs: dict[tuple, list[ModelSpec]] = {}  # extraction settings (layers, positions) → models to extract with them
    for spec in cfg.models:
        expected, layers = model_info(spec, cfg, fp)
        need = layers if need_layers is None else [x for x in need_layers if x <= expected["num_layers"]]
        old = store.stored_info(spec.label)
        asked = (_key(cfg.extract.layers), tuple(cfg.extract.positions))
        if old is None:
            gaps.append(f"model {spec.label!r}: not extracted")
            runs.setdefault(asked, []).append(spec)
            continue
        stale = identity_changes(old, expected, VECTOR_FIELDS)
        if stale:
            gaps.append(f"model {spec.label!r}: stored activations are stale, made with another " + "; ".join(stale))
            runs.setdefault(asked, []).append(spec)
            continue
        lacking_layers = sorted(set(need) - set(old["layers"]))
        lacking_pos = [p for p in cfg.extract.positions if p not in old["positions"]]
        if lacking_layers or lacking_pos:
            gaps.append(
                f"model {spec.label!r}: "
                + ", ".join(
                    x
                    for x in (
                        f"layers {lacking_layers} not stored" if lacking_layers else "",
                        f"positions {lacking_pos} not stored" if lacking_pos else "",
                    )
                    if x
                )
                + f" (stored: layers {old['layers']}, positions {old['positions']})"
            )
            union = (
                tuple(sorted(set(old["layers"]) | set(layers))),
                tuple(dict.fromkeys([*old["positions"], *lacking_pos])),
            )
            runs.setdefault(union, []).append(spec)
            continue
        missing = n_shards - len(store.done_shards(spec.label) & set(range(n_shards)))
        if missing:
            gaps.append(f"model {spec.label!r}: {missing} of {n_shards} shards not extracted")
            runs.setdefault((tuple(old["layers"]), tuple(old["positions"])), []).append(spec)
    result = Activations(store, {})
    if gaps and not extract_if_missing:
        raise OutputError(
            f"the {what} are incomplete or stale: " + "; ".join(gaps),
            where=str(store.root),
            fix="set extract_if_missing: true, or run `raysafe extract` with the same models, data and extract settings",
        )
    if gaps:
        log.info("%s in %s: %s → extracting", what, store.root, "; ".join(gaps))
        import ray

        started = not ray.is_initialized()
        try:
            for (layers, positions), specs in runs.items():
                ex = cfg.extract.model_copy(update={"layers": layers if layers == "all" else list(layers)})
                ex = ex.model_copy(update={"positions": list(positions)})
                res = run_extract(cfg.model_copy(update={"models": specs, "extract": ex}), progress=progress)
                for line in res.summary().splitlines():
                    log.info("%s: %s", what, line)
                result.extracted += [s.label for s in specs]
                if res.mlflow_run_id:
                    result.mlflow_run_ids.append(res.mlflow_run_id)
        finally:
            if shutdown_ray and started and ray.is_initialized():
                ray.shutdown()  # free the local instance's memory and cores for what follows
    else:
        log.info("%s: complete and current in %s, nothing to extract", what, store.root)
    for spec in cfg.models:
        result.identities[spec.label] = identity_record(store.model_info(spec.label))
    return result


def _key(layers: list[int] | str) -> tuple | str:
    return layers if isinstance(layers, str) else tuple(layers)
