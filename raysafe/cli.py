"""The ``raysafe`` command: one sub-command per flow, each taking a YAML config and ``--set key=value`` overrides.

Every sub-command calls the same flow function that ``jobs/`` and the tests call. User errors (bad config, bad data,
missing model) print what/where/fix and exit with status 2, without a traceback (``--debug`` shows it).
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Callable

from raysafe.errors import RaysafeError

FLOWS: dict[str, tuple[str, Callable[[argparse.Namespace], int]]] = {}


def flow(name: str, help_text: str):
    def register(fn):
        FLOWS[name] = (help_text, fn)
        return fn

    return register


def _config(args, cls):
    from raysafe.config import load_config

    return load_config(cls, args.config, args.set)


@flow("extract", "stream texts through a model actor pool and store pooled hidden states per layer (Parquet)")
def _extract(args) -> int:
    from raysafe.config import ExtractConfig
    from raysafe.extract.pipeline import run_extract

    cfg = _config(args, ExtractConfig)
    res = run_extract(cfg)
    print(f"activations in {res.output_dir}  (dataset {res.dataset_fingerprint}, rows per language {res.rows_per_lang})")
    for m in res.models.values():
        print(f"  {m.label}: {m.shards_extracted}/{m.shards_total} shards extracted now, {m.tokens:,} tokens, "
              f"{m.tokens_per_s:,.0f} tokens/s, {m.n_truncated} truncated")
    if res.mlflow_run_id:
        print(f"MLflow run {res.mlflow_run_id}")
    return 0


@flow("bench", "benchmarks (scripts, not tests): `raysafe bench extract --help`")
def _bench(args) -> int:
    from raysafe.bench import run_bench

    return run_bench(args.config, args.rest)


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
    for name, (help_text, _) in FLOWS.items():
        sp = sub.add_parser(name, help=help_text, description=help_text)
        if name == "bench":
            sp.add_argument("config", metavar="NAME", help="which benchmark: extract")
            sp.add_argument("rest", nargs=argparse.REMAINDER, help="the benchmark's own options (see its --help)")
            sp.set_defaults(set=[])
            continue
        sp.add_argument("config", help="YAML config file")
        sp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field, e.g. --set ray.num_actors=4 (repeatable; values parse as YAML)")
        sp.add_argument("--print-config", action="store_true", help="print the validated config as YAML and exit")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("httpx", "urllib3", "filelock", "alembic", "mlflow.store.db.utils"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    _, fn = FLOWS[args.flow]
    try:
        if getattr(args, "print_config", False):
            from raysafe.config import dump_config

            cls = _config_class(args.flow)
            print(dump_config(_config(args, cls)))
            return 0
        return fn(args)
    except RaysafeError as e:
        if args.debug:
            raise
        print(f"raysafe {args.flow}: error: {e}", file=sys.stderr)
        return 2


def _config_class(flow_name: str):
    import raysafe.config as c

    return {"extract": c.ExtractConfig}[flow_name]


if __name__ == "__main__":
    sys.exit(main())
