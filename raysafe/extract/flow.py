"""The extraction flow: validated rows → input shards → Ray Data (tokenise on CPU → model actor pool) → store.

``run_extract(cfg)`` is what ``raysafe extract``, ``jobs/extract.py`` and the tests call. It is
resumable: shards already marked done for a model are skipped, so a re-run after a kill extracts only what is
missing and ends with the same data as an uninterrupted run.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

from raysafe import tracking
from raysafe.atomic import atomic_write_json, atomic_write_parquet
from raysafe.config import ModelSpec, dump_config
from raysafe.data import schemas
from raysafe.data.sources import load_table, to_text_rows
from raysafe.errors import ConfigError, OutputError
from raysafe.extract.config import ExtractConfig
from raysafe.extract.store import ActivationStore
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


def write_inputs(store: ActivationStore, rows: pl.DataFrame, shard_rows: int, fp: str) -> int:
    """Write input shards once per dataset; refuse a directory prepared for other inputs. Returns the shard count."""
    marker = store.root / "inputs" / "_dataset.json"
    n_shards = (rows.height + shard_rows - 1) // shard_rows
    if marker.exists():
        import json

        old = json.loads(marker.read_text())
        if old["fingerprint"] != fp or old["shard_rows"] != shard_rows:
            raise OutputError(
                f"{store.root} holds activations of other inputs (dataset {old['fingerprint']}, shard_rows "
                f"{old['shard_rows']}; now {fp}, {shard_rows})",
                where=str(marker),
                fix="choose a new output_dir for a different dataset or sharding",
            )
        return n_shards
    table = rows.to_arrow()
    for k in range(n_shards):
        atomic_write_parquet(store.input_path(k), table.slice(k * shard_rows, shard_rows))
    atomic_write_json(marker, {"fingerprint": fp, "shard_rows": shard_rows, "rows": rows.height, "shards": n_shards})
    return n_shards


def model_info(spec: ModelSpec, cfg: ExtractConfig, dataset_fp: str) -> tuple[dict, list[int]]:
    """The model's identity record for the store, and its validated layer list (raises before any work starts)."""
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
        "max_length": cfg.extract.max_length,
        "chat_template": cfg.extract.template_identity(spec.label),
        "truncate": cfg.extract.truncate,
        "shard_rows": cfg.extract.shard_rows,
        "dataset_fingerprint": dataset_fp,
    }
    return info, layers


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
    progress: bool = True,
) -> list[dict]:
    """Run the Ray Data pipeline over the ``missing`` shards of one model; returns one summary per shard."""
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
            "torch_threads": _actor_threads(cfg),
        },
        batch_size=1,
        num_gpus=cfg.ray.num_gpus_per_actor or None,
        num_cpus=cfg.ray.num_cpus_per_actor,
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=cfg.ray.num_actors),
        **actor_remote_args(cfg.ray),
    )
    summaries = []
    with tqdm(total=len(missing), desc=f"extract {spec.label}", unit="shard", disable=not progress) as bar:
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
        plans.append((spec, info, layers))
    n_shards = write_inputs(store, rows, cfg.extract.shard_rows, fp)
    for spec, info, _ in plans:
        store.claim(spec.label, info)
    rows_per_lang = dict(sorted(Counter(rows["lang"].to_list()).items()))
    result = ExtractResult(Path(cfg.output_dir), fp, rows_per_lang)
    with tracking.run(cfg.tracking, "extract", tags={"raysafe.flow": "extract"}) as mlrun:
        tracking.log_params({"config": cfg.model_dump(mode="json"), "dataset_fingerprint": fp})
        name = f"{cfg.data.name or cfg.data.path} ({contract_name(cfg)})"
        tracking.log_input(name, {"data": cfg.data}, fp, rows.height, context="extraction")
        tracking.log_metrics({f"rows_{lang}": n for lang, n in rows_per_lang.items()})
        for spec, _info, layers in plans:
            done = store.done_shards(spec.label)
            missing = [k for k in range(n_shards) if k not in done]
            t0 = time.perf_counter()
            summaries = extract_model(cfg, spec, layers, store, missing, progress) if missing else []
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
            "models": {spec.label: info for spec, info, _ in plans},
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
