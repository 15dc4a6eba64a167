"""The alignment flow: validate → (precompute reference log-probs) → Ray Train + DeepSpeed → HF checkpoint → MLflow.

``run_train(cfg)`` is what ``raysafe train``, ``jobs/train.py``, the sweep and the tests call. Everything that
can be checked before workers start is checked first: data (missing variants for a mixture language, empty
answers), the model and the MLC layer, the ZeRO/offload/precision combination against the hardware, a resume
path that holds another model's checkpoint, a run directory that holds another run (its identity differs:
``raysafe.train.identity``) or a checkpoint that fails its manifest of digests, and a run directory that another
live run holds (its lock).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from raysafe import tracking
from raysafe.atomic import atomic_write_json
from raysafe.errors import ConfigError, OutputError, remote_errors
from raysafe.identity import fingerprint
from raysafe.train.checkpoint import CONFIG_FILE, HF_DIR, STATE_FILE
from raysafe.train.config import TrainConfig
from raysafe.train.data import epoch_order, load_samples
from raysafe.train.ds_config import check_hardware, prepare_cpu_comm
from raysafe.train.identity import IDENTITY_FILE, check_same_run, read_identity, run_identity
from raysafe.train.losses import needs_reference
from raysafe.train.manifest import verify_manifest
from raysafe.train.worker import train_loop

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    checkpoint_dir: Path
    model_dir: Path
    steps: int
    metrics: dict
    record: list[dict]
    mlflow_run_id: str | None
    total_steps: int | None = None

    def summary(self) -> str:
        lines = [
            f"trained {self.steps} steps; final loss {self.metrics.get('loss/total', float('nan')):.4f}",
            f"checkpoint: {self.checkpoint_dir}",
            f"model (Hugging Face dir, usable as a model path): {self.model_dir}",
        ]
        if self.total_steps is not None and self.steps < self.total_steps:
            lines.append(
                f"stopped after {self.steps} of {self.total_steps} steps (checkpoint.stop_after_steps): run the "
                "same command without it to continue"
            )
        if self.mlflow_run_id:
            lines.append(f"MLflow run {self.mlflow_run_id}")
        return "\n".join(lines)


def run_name(cfg: TrainConfig) -> str:
    if cfg.checkpoint.name:
        return cfg.checkpoint.name
    mlc = f"mlc{cfg.mlc.weight:g}" if cfg.mlc.weight > 0 else "nomlc"
    return f"{cfg.model.label}-{cfg.loss.name}-{mlc}-s{cfg.seed}"


def _check_resume(cfg: TrainConfig) -> str | None:
    """The checkpoint to start from, after checking that it belongs to this model and that raysafe wrote it."""
    path = cfg.checkpoint.resume_from
    if path is None or path == "latest":
        return None
    p = Path(path)
    state = p / STATE_FILE
    if not state.exists():
        raise OutputError(
            f"{p} is not a raysafe training checkpoint (no {STATE_FILE})",
            where="checkpoint.resume_from",
            fix="give a checkpoint directory written by `raysafe train` (.../checkpoint_*)",
        )
    info = json.loads(state.read_text())
    if info.get("model_path") != cfg.model.path:
        raise OutputError(
            f"checkpoint {p} was trained from model {info.get('model_path')!r}, not {cfg.model.path!r}",
            where="checkpoint.resume_from",
            fix="resume with the model the checkpoint came from, or start a new run without resume_from",
        )
    try:
        verify_manifest(p, info.get("world_size"))
    except OutputError as e:
        raise OutputError(e.what, where=f"checkpoint.resume_from ({e.where})", fix=e.fix) from None
    return str(p)


def worker_resources(cfg: TrainConfig) -> dict[str, float]:
    """What the run's Ray Train workers reserve together."""
    need = {"CPU": cfg.ray.num_workers * cfg.ray.cpus_per_worker}
    if cfg.ray.use_gpu:
        need["GPU"] = float(cfg.ray.num_workers)
    return need


def check_cluster(cfg: TrainConfig) -> None:
    """Refuse a run that even the full cluster cannot hold (what its autoscaler can grow it to, else
    ``ray.capacity``: :func:`raysafe.runtime.cluster_capacity`); a run that only waits for nodes to come up starts,
    and Ray's autoscaler adds the nodes its workers' placement group asks for. Ray must be initialised."""
    from raysafe.runtime import cluster_capacity

    cap = cluster_capacity(cfg.ray.capacity)
    need = worker_resources(cfg)
    if short := cap.shortfall(need):
        raise ConfigError(
            f"{cfg.ray.num_workers} train worker(s) need {' and '.join(short)}; the cluster: {cap.describe()}",
            where="ray.num_workers / ray.cpus_per_worker / ray.use_gpu",
            fix="lower ray.num_workers or ray.cpus_per_worker, run on a bigger cluster (RAY_ADDRESS), or, where the "
            "cluster scales up and its autoscaler reports no limits, declare what it can grow to in ray.capacity",
        )
    if cap.most is None:
        log.warning("cannot tell whether the cluster can ever hold %s: %s", need, cap.describe())
    elif cap.waits_for_nodes(need):
        log.info("the workers need more than the nodes up now hold (%s): Ray's autoscaler adds nodes", cap.describe())


def validate(cfg: TrainConfig) -> tuple[pl.DataFrame, str | None]:
    """All checks that need no worker (and, when Ray is up, the cluster's capacity). Returns the samples and the
    checkpoint to resume from."""
    import ray

    check_hardware(cfg.deepspeed, cfg.ray.use_gpu, cfg.lora.enabled)
    if ray.is_initialized():
        check_cluster(cfg)
    samples = load_samples(cfg.data, cfg.mixture, cfg.seed)
    if cfg.mlc.weight > 0:
        from raysafe.models.loading import model_depth

        cfg.mlc.resolve_layer(model_depth(cfg.model))
    resume = _check_resume(cfg)
    per_step = cfg.optim.micro_batch * cfg.ray.num_workers * cfg.optim.grad_accum
    if samples.height < per_step:
        raise ConfigError(
            f"{samples.height} training pairs cannot fill one optimiser step of {per_step} pairs "
            "(micro_batch x workers x grad_accum)",
            where="optim",
            fix="lower optim.micro_batch or optim.grad_accum (or ray.num_workers), or add pairs",
        )
    return samples, resume


def total_steps(cfg: TrainConfig, n: int) -> int:
    per_step = cfg.optim.micro_batch * cfg.ray.num_workers * cfg.optim.grad_accum
    steps = (n * cfg.optim.epochs) // per_step
    return min(steps, cfg.optim.max_steps) if cfg.optim.max_steps else steps


def precompute_reference(cfg: TrainConfig, samples: pl.DataFrame) -> pl.DataFrame:
    """sample_idx, ref_chosen, ref_rejected for every sample, by a Ray Data actor pass over the reference model."""
    import ray

    from raysafe.train.reference import ReferenceStage

    ds = ray.data.from_arrow(samples.to_arrow())
    out = ds.map_batches(
        ReferenceStage,
        fn_constructor_kwargs={"cfg": cfg.model_dump(mode="json"), "torch_threads": cfg.ray.torch_threads},
        batch_size=max(1, cfg.optim.micro_batch * 2),
        num_gpus=1 if cfg.ray.use_gpu else None,
        num_cpus=cfg.ray.cpus_per_worker,
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=cfg.ray.num_workers),
    )
    import pyarrow as pa

    with remote_errors():
        tables = ray.get(out.to_arrow_refs())
    return pl.from_arrow(pa.concat_tables(tables)).select("sample_idx", "ref_chosen", "ref_rejected")


def _reference_mode(cfg: TrainConfig) -> tuple[bool, bool]:
    """(precompute, reference model on each worker)."""
    if not needs_reference(cfg.loss.name):
        return False, False
    pre = cfg.precompute_reference in ("auto", "on")
    return pre, not pre


def identity_of(cfg: TrainConfig, samples: pl.DataFrame) -> dict:
    """The run identity of ``cfg`` on its loaded ``samples`` (raysafe.train.identity)."""
    from raysafe.models.loading import resolve

    ref = resolve(cfg.reference).fingerprint if cfg.reference is not None else None
    return run_identity(cfg, samples, resolve(cfg.model).fingerprint, ref)


def run_dir(cfg: TrainConfig) -> Path | None:
    """The run's directory under a local storage path (None for a storage URI)."""
    if "://" in cfg.checkpoint.storage_path:
        return None
    return Path(cfg.checkpoint.storage_path).resolve() / run_name(cfg)


def claim_run_dir(cfg: TrainConfig, identity: dict, restart: bool) -> None:
    """Make the run directory this run's: move the old one aside (``restart``), or check that it holds this run
    (same identity: resume) and refuse another one; then record the identity."""
    from raysafe.locks import move_aside

    d = run_dir(cfg)
    if d is None:
        log.warning("checkpoint.storage_path is a URI: the run's identity is stored in each checkpoint only")
        return
    if restart:
        move_aside(d)
    check_same_run(d, read_identity(d / IDENTITY_FILE), identity)
    for state in sorted(d.glob(f"checkpoint_*/{STATE_FILE}")):  # what Ray Train may resume from: checked first
        verify_manifest(state.parent, json.loads(state.read_text()).get("world_size"))
    atomic_write_json(d / IDENTITY_FILE, identity)


def run_train(
    cfg: TrainConfig, progress: bool = True, restart: bool = False, lock: bool = True, callbacks: list | None = None
) -> TrainResult:
    """Train ``cfg.model`` with the alignment loss + λ·MLC on Ray Train workers; return the final checkpoint.

    The run directory (``storage_path/name``) is locked while the run writes it (``lock``: the sweep holds its own
    lock over its trials' runs). A run directory holding a run of the same identity is resumed from its latest
    checkpoint; one of another identity is refused with the differing fields named; ``restart`` moves the old
    run aside first (``<name>.replaced-<time>``) and starts afresh. ``callbacks``: Ray Train ``UserCallback``s for
    the trainer's RunConfig (the sweep's trials pass one that forwards every report to Tune)."""
    import contextlib

    import ray

    from raysafe.config import RaySpec
    from raysafe.locks import output_lock
    from raysafe.runtime import ensure_ray

    samples, resume = validate(cfg)
    if not ray.is_initialized():  # validate checks the cluster's capacity when Ray is up: join (or start) it now
        ensure_ray(RaySpec(address=cfg.ray.address))
        check_cluster(cfg)
    identity = identity_of(cfg, samples)
    d = run_dir(cfg)
    held = output_lock(d, f"training run {d}") if (lock and d is not None) else contextlib.nullcontext()
    with held:
        claim_run_dir(cfg, identity, restart)
        return _fit(cfg, samples, resume, identity, callbacks)


def _log_run_inputs(cfg: TrainConfig, samples: pl.DataFrame, steps: int) -> None:
    """The config, step count and training pairs (with their fingerprint) on the MLflow run."""
    tracking.log_params({"config": cfg.model_dump(mode="json"), "total_steps": steps, "pairs": samples.height})
    tracking.log_input(
        f"preference pairs + prompt variants (split {cfg.data.split})",
        {"pairs": cfg.data.pairs, "variants": cfg.data.variants},
        fingerprint(samples),
        samples.height,
        context="training",
    )


def _training_table(cfg: TrainConfig, samples: pl.DataFrame, steps: int, pre: bool) -> pl.DataFrame:
    """The samples in the order the run consumes them (only as many as it consumes), with their reference
    log-probs when those are precomputed on the driver."""
    order = epoch_order(samples.height, cfg.optim.epochs, cfg.seed)
    per_step = cfg.optim.micro_batch * cfg.ray.num_workers * cfg.optim.grad_accum
    order = order.filter(pl.col("pos") < steps * per_step)  # only what the run will consume
    if pre:
        needed = samples.filter(pl.col("sample_idx").is_in(order["sample_idx"].unique().implode()))
        log.info("precomputing reference log-probs for the %d pairs the run consumes", needed.height)
        refs = precompute_reference(cfg, needed)
        samples = samples.join(refs, on="sample_idx", how="left")
    return order.join(samples, on="sample_idx", how="left").sort("pos")


def _torch_trainer(
    cfg: TrainConfig, ds, loop_config: dict, name: str, storage_path: str, resume: str | None, callbacks: list | None
):
    """Ray Train's TorchTrainer over ``ds`` (in order, unsplit) running ``train_loop`` on the configured workers,
    with ``callbacks`` (Ray Train ``UserCallback``s) in its RunConfig."""
    from ray.data import ExecutionOptions
    from ray.train import (
        Checkpoint,
        CheckpointConfig,
        DataConfig,
        FailureConfig,
        RunConfig,
        ScalingConfig,
    )
    from ray.train.torch import TorchTrainer

    return TorchTrainer(
        train_loop,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(
            num_workers=cfg.ray.num_workers,
            use_gpu=cfg.ray.use_gpu,
            resources_per_worker={"CPU": cfg.ray.cpus_per_worker},
        ),
        run_config=RunConfig(
            name=name,
            storage_path=storage_path,
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.checkpoint.keep),
            failure_config=FailureConfig(max_failures=cfg.checkpoint.max_failures),
            callbacks=callbacks or None,
        ),
        datasets={"train": ds},
        dataset_config=DataConfig(datasets_to_split=[], execution_options=ExecutionOptions(preserve_order=True)),
        resume_from_checkpoint=Checkpoint.from_directory(resume) if resume else None,
    )


def _final_checkpoint(result, name: str, storage_path: str) -> tuple[Path, dict]:
    """(directory, saved state) of the run's last checkpoint; refuses a run that produced none."""
    if result.checkpoint is None:
        raise OutputError(
            f"training run {name} produced no checkpoint",
            where=storage_path,
            fix="look at the worker logs above; re-running resumes from the latest checkpoint",
        )
    ckpt_dir = Path(result.checkpoint.path)
    if not (ckpt_dir / HF_DIR / "config.json").is_file():  # the last checkpoint of a call carries the export
        raise OutputError(
            f"the last checkpoint of training run {name} holds no exported model ({HF_DIR}/)",
            where=str(ckpt_dir),
            fix=f"run `raysafe export {ckpt_dir} --merge` to build it from the checkpoint's DeepSpeed files",
        )
    return ckpt_dir, json.loads((ckpt_dir / STATE_FILE).read_text())


def _log_checkpoint(ckpt_dir: Path) -> None:
    """The final checkpoint's lineage on the MLflow run: path and identity (parameter, tags, an external MLflow
    model that runs loading it take as input), its state, config and identity files."""
    tracking.log_checkpoint(ckpt_dir, (STATE_FILE, CONFIG_FILE, IDENTITY_FILE))


def _fit(cfg: TrainConfig, samples: pl.DataFrame, resume: str | None, identity: dict, callbacks=None) -> TrainResult:
    import ray

    from raysafe.config import RaySpec
    from raysafe.runtime import ensure_ray, quiet_ray_data

    if not cfg.ray.use_gpu:
        prepare_cpu_comm()
    ensure_ray(RaySpec(address=cfg.ray.address))
    quiet_ray_data()
    steps = total_steps(cfg, samples.height)
    pre, ref_on_worker = _reference_mode(cfg)
    name = run_name(cfg)
    storage = Path(cfg.checkpoint.storage_path).resolve() if "://" not in cfg.checkpoint.storage_path else None
    storage_path = str(storage) if storage else cfg.checkpoint.storage_path

    with tracking.run(cfg.tracking, f"train {name}", tags={"raysafe.flow": "train"}) as mlrun:
        _log_run_inputs(cfg, samples, steps)
        table = _training_table(cfg, samples, steps, pre)
        ds = ray.data.from_arrow(table.to_arrow())
        loop_config = {
            "cfg": cfg.model_dump(mode="json"),
            "total_steps": steps,
            "reference_on_worker": ref_on_worker,
            "mlflow": tracking.attach_info(cfg.tracking, mlrun),
            "identity": identity,
        }
        trainer = _torch_trainer(cfg, ds, loop_config, name, storage_path, resume, callbacks)
        with remote_errors():
            result = trainer.fit()
        ckpt_dir, state = _final_checkpoint(result, name, storage_path)
        if mlrun is not None:
            _log_checkpoint(ckpt_dir)
    return TrainResult(
        ckpt_dir,
        ckpt_dir / HF_DIR,
        state["step"],
        state["metrics"],
        state["record"],
        mlrun.info.run_id if mlrun is not None else None,
        steps,
    )
