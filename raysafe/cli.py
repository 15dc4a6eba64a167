"""The ``raysafe`` command: one sub-command per flow, each taking a YAML config and ``--set key=value`` overrides.

Every sub-command calls the same flow function that ``jobs/`` and the tests call. User errors (bad config, bad data,
missing model) print what/where/fix and exit with status 2, without a traceback (``--debug`` shows it).
"""

from __future__ import annotations

import argparse
import logging
import sys

from raysafe.errors import RaysafeError

#: flow name -> (help, "module:ConfigClass", "module:run_function"). Each run function takes the validated config and
#: returns a result object with a ``summary() -> str`` method; ``jobs/`` and the tests call the same functions.
FLOWS: dict[str, tuple[str, str, str]] = {
    "study": (
        "the closed loop: analyse the base model, train with MLC (and the λ = 0 control), analyse the "
        "checkpoints, report before/after (the main job)",
        "raysafe.study.config:StudyConfig",
        "raysafe.study.flow:run_study",
    ),
    "extract": (
        "stream texts through a model actor pool and store pooled hidden states per layer (Parquet)",
        "raysafe.extract.config:ExtractConfig",
        "raysafe.extract.flow:run_extract",
    ),
    "train": (
        "MLC-augmented preference optimisation (DPO, SimPO, ORPO, SFT + λ·L_mlc) on Ray Train + DeepSpeed ZeRO",
        "raysafe.train.config:TrainConfig",
        "raysafe.train.flow:run_train",
    ),
    "separation": (
        "per-language separation of toxic vs benign hidden states, base vs aligned model, per layer "
        "(PCA, Bhattacharyya, silhouette, probe; alignment shift; detox displacement)",
        "raysafe.separation.config:SeparationConfig",
        "raysafe.separation.flow:run_separation",
    ),
    "concepts": (
        "multilingual value concepts: recognition, cross-lingual consistency, URIEL distance, transfer and "
        "steering (cross-lingual control)",
        "raysafe.concepts.config:ConceptsConfig",
        "raysafe.concepts.flow:run_concepts",
    ),
    "evaluate": (
        "multilingual safety evaluation: generate per language (actor pool), judge (offline patterns, "
        "safety classifier or OpenAI-compatible endpoint), safety rate / variance / agreement with "
        "bootstrap CIs, and multiple-choice utility",
        "raysafe.evaluate.config:EvaluateConfig",
        "raysafe.evaluate.flow:run_evaluate",
    ),
    "sweep": (
        "Ray Tune sweep over λ, β, τ, the MLC layer, lr and the language mixture: each trial trains, "
        "evaluates and is scored; MLflow parent/child runs, results table, Pareto plot, best train config",
        "raysafe.sweep.config:SweepConfig",
        "raysafe.sweep.flow:run_sweep",
    ),
    "translate": (
        "translate prompt / preference sets into N languages on an MT actor pool (NLLB, M2M100, Marian, an LLM or "
        "an OpenAI-compatible endpoint), with per-row language-ID, round-trip chrF and length checks",
        "raysafe.translate.config:TranslateConfig",
        "raysafe.translate.flow:run_translate",
    ),
}
#: flows with resumable outputs: `--restart` moves their old outputs aside (renamed <dir>.replaced-<UTC time>, nothing
#: is deleted) and starts afresh, where a re-run would otherwise resume them or refuse them as another run's.
RESTARTABLE: dict[str, str] = {
    "train": "the run directory (checkpoint.storage_path/checkpoint.name)",
    "study": "the study's output_dir",
    "sweep": "the sweep directory (output_dir/name)",
    "evaluate": "the output_dir",
}
BENCH_HELP = "benchmarks (scripts, not tests): `raysafe bench NAME --help`"
PREPARE_HELP = (
    "convert models to the cached safetensors form once, before any job (a .gguf file or the packaged "
    "'gemma3-270m': the GGUF dequantisation takes minutes on a CPU); prints each model's directory"
)

EXPORT_HELP = (
    "the Hugging Face export of a training checkpoint, built on the CPU from its DeepSpeed files (no GPU, no Ray): "
    "model/ (a plain model), and adapter/ for LoRA runs; the probe round trip is checked. The last checkpoint of a "
    "training call already holds model/"
)


def run_export(args) -> int:
    from raysafe.train.export import export_checkpoint

    print(export_checkpoint(args.checkpoint, args.out, merge=args.merge).summary())
    return 0


def run_prepare(models: list[str]) -> int:
    from raysafe.config import ModelSpec
    from raysafe.models.loading import resolve

    for path in models:
        print(f"{path}: {resolve(ModelSpec(path=path)).path}")
    return 0


def _resolve(ref: str):
    import importlib

    module, attr = ref.split(":")
    return getattr(importlib.import_module(module), attr)


def _config(args, cls):
    from raysafe.config import load_config

    # --print-config checks a config anywhere (a cluster config's shared paths need not exist on a laptop)
    return load_config(cls, args.config, args.set, check_paths=not getattr(args, "print_config", False))


def run_flow(name: str, args) -> int:
    _, cfg_ref, run_ref = FLOWS[name]
    cfg = _config(args, _resolve(cfg_ref))
    if getattr(args, "print_config", False):
        from raysafe.config import dump_config

        print(dump_config(cfg))
        return 0
    from raysafe.kernels import log_kernel_report

    log_kernel_report(name, cfg)  # which attention kernel and DeepSpeed ops this job will use (logs, never fails)
    kwargs = {"restart": True} if getattr(args, "restart", False) else {}
    result = _resolve(run_ref)(cfg, **kwargs)
    print(result.summary())
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="raysafe",
        description="Ray-distributed studies of multilingual safety alignment in LLMs. Each flow takes a YAML config "
        "(examples in jobs/configs/) and --set key.path=value overrides; outputs go to MLflow "
        "(sqlite:///mlflow.db by default, or MLFLOW_TRACKING_URI).",
    )
    p.add_argument("--debug", action="store_true", help="show tracebacks for user errors")
    p.add_argument("-q", "--quiet", action="store_true", help="only warnings and results")
    sub = p.add_subparsers(dest="flow", metavar="FLOW", required=True)
    for name, (help_text, _, _) in FLOWS.items():
        sp = sub.add_parser(name, help=help_text, description=help_text)
        sp.add_argument("config", help="YAML config file")
        sp.add_argument(
            "--set",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="override a config field, e.g. --set ray.num_actors=4 (repeatable; values parse as YAML)",
        )
        sp.add_argument(
            "--print-config",
            action="store_true",
            help="print the validated config as YAML and exit (local paths made absolute, not checked)",
        )
        if name in RESTARTABLE:
            sp.add_argument(
                "--restart",
                action="store_true",
                help=f"start afresh: move {RESTARTABLE[name]} aside to <dir>.replaced-<UTC time> (kept, not deleted) "
                "instead of resuming it or refusing it as another run's",
            )
    from raysafe.bench import BENCHES

    sp = sub.add_parser("bench", help=BENCH_HELP, description=BENCH_HELP)
    sp.add_argument("name", choices=sorted(BENCHES), help="which benchmark")
    sp.add_argument("rest", nargs=argparse.REMAINDER, help="the benchmark's own options (see its --help)")
    sp = sub.add_parser("export", help=EXPORT_HELP, description=EXPORT_HELP)
    sp.add_argument("checkpoint", help="a checkpoint directory written by `raysafe train` (.../checkpoint_*)")
    sp.add_argument("--out", default=None, help="where to write (default: <run dir>/exports/<checkpoint name>)")
    sp.add_argument(
        "--merge",
        action="store_true",
        help="LoRA: also merge the adapter into the base weights on the CPU and write model/ (a plain model, what "
        "evaluate/extract/study load); without it a LoRA checkpoint exports adapter/ only",
    )
    sp = sub.add_parser("prepare", help=PREPARE_HELP, description=PREPARE_HELP)
    sp.add_argument("models", nargs="*", default=["gemma3-270m"], help="model paths or aliases (default: gemma3-270m)")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("httpx", "urllib3", "filelock", "alembic", "mlflow.store.db.utils"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        if args.flow == "bench":
            from raysafe.bench import run_bench

            return run_bench(args.name, args.rest)
        if args.flow == "prepare":
            return run_prepare(args.models)
        if args.flow == "export":
            return run_export(args)
        return run_flow(args.flow, args)
    except RaysafeError as e:
        if args.debug:
            raise
        print(f"raysafe {args.flow}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if args.debug:
            raise
        # Shards, stages, checkpoints and trials are written atomically as they finish: nothing finished is lost.
        print(
            f"raysafe {args.flow}: interrupted. What finished is kept (shards, stages, checkpoints, trials); run "
            "the same command again to continue from there.",
            file=sys.stderr,
        )
        return 130


if __name__ == "__main__":
    sys.exit(main())
