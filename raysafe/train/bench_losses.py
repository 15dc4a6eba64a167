"""Benchmark of the loss path: chunked label log-probs vs the naive float32 log_softmax, and the cost of the MLC term.

Part 1 compares :func:`raysafe.train.logprobs.sequence_logprobs` with ``log_softmax(logits.float()).gather`` on
Gemma-3-270M-sized logits (vocab 262,144), forward and forward+backward. Part 2 times one training step (policy
forward + loss + backward) of a tiny random Gemma 3 with Gemma-3-270M's width (hidden 640, vocab 262,144, few
layers) on the same collated batch: DPO only (answer rows only) vs DPO + MLC (answer rows + B·m variant rows,
projection head, SVD loss), and the MLC term alone (head + loss, forward+backward).

Memory method: every measurement runs in a fresh subprocess; glibc's mmap threshold is fixed at 1 MiB so freed
tensors return to the OS; the peak RSS (VmHWM) is reset through ``/proc/self/clear_refs`` after the inputs exist
and after one warm-up run, and the reported peak is ``VmHWM − VmRSS`` measured around one more run (Linux only).
Times are medians of ``--repeats`` runs after the warm-up.

Example::

    raysafe bench losses     # defaults: rows 8, tokens 256, vocab 262144, bf16
    raysafe bench losses --rows 4 --tokens 128 --skip-mlc
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

LANGS = ["en", "zh", "ar", "hi", "bn", "ru", "de", "es", "ja", "sw", "th", "ko"]


# ------------------------------------------------------------------------------------------------- measuring
def _fix_malloc() -> None:
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD = 1 MiB, disables the dynamic threshold
    except OSError:
        pass


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key):
                return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/self/status")


def _measure(fn: Callable[[], object], repeats: int) -> dict[str, float]:
    """Warm up once, then peak RSS growth (MiB) of one run and the median time (s) of ``repeats`` runs."""
    fn()
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    base = _status_kib("VmRSS:")
    fn()
    peak_mib = (_status_kib("VmHWM:") - base) / 1024
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return {"peak_mib": peak_mib, "time_s": statistics.median(times)}


# ---------------------------------------------------------------------------------------------------- workers
def _worker_logprobs(args: argparse.Namespace) -> dict[str, float]:
    import torch

    from raysafe.train.logprobs import sequence_logprobs

    torch.manual_seed(0)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    logits = torch.randn(args.rows, args.tokens, args.vocab, dtype=dtype)
    labels = torch.randint(0, args.vocab, (args.rows, args.tokens))
    labels[:, : args.tokens // 4] = -100  # a prompt
    backward = args.worker.endswith("backward")
    if backward:
        logits.requires_grad_(True)

    def naive() -> torch.Tensor:
        shifted = labels[:, 1:]
        mask = shifted != -100
        lp = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, shifted.clamp(min=0)[..., None])[..., 0]
        return (lp * mask).sum(-1)

    def lean() -> torch.Tensor:
        return sequence_logprobs(logits, labels, chunk_positions=args.chunk_positions)[0]

    impl = naive if args.worker.startswith("naive") else lean

    def run() -> None:
        out = impl()
        if backward:
            logits.grad = None
            out.sum().backward()
            logits.grad = None

    if not backward:
        with torch.no_grad():
            return _measure(run, args.repeats)
    return _measure(run, args.repeats)


def _worker_step(args: argparse.Namespace) -> dict[str, float]:
    import torch

    from raysafe.models.tiny import tiny_model, tiny_tokenizer
    from raysafe.train.collate import PreferenceCollator
    from raysafe.train.forward import policy_forward
    from raysafe.train.losses import dpo_loss
    from raysafe.train.mlc import MLCHead, mlc_loss

    torch.manual_seed(0)
    model = tiny_model("gemma3", num_layers=args.layers, hidden=args.hidden, vocab_size=args.model_vocab).train()
    head = MLCHead(args.hidden, args.d)
    tok = tiny_tokenizer(padding_side="left", chat_template=True)
    prompt = "p" * args.prompt_tokens
    samples = [
        {
            "group_id": f"g{i}",
            "prompt": prompt,
            "chosen": "c" * args.answer_tokens,
            "rejected": "r" * args.answer_tokens,
            "variants": [(LANGS[j] if j < len(LANGS) else f"x{j}", prompt) for j in range(args.m)],
        }
        for i in range(args.pairs)
    ]
    batch = PreferenceCollator(tok, max_length=4096, max_prompt_length=None)(samples)
    ref = torch.zeros(args.pairs)
    layer = max(1, args.layers // 2)

    def dpo_step() -> None:
        out = policy_forward(model, batch, mlc_layer=None)
        loss = dpo_loss(out.chosen_logps, out.rejected_logps, ref, ref).loss
        loss.backward()
        model.zero_grad(set_to_none=True)

    def dpo_mlc_step() -> None:
        out = policy_forward(model, batch, mlc_layer=layer)
        loss = dpo_loss(out.chosen_logps, out.rejected_logps, ref, ref).loss
        loss = loss + 0.8 * mlc_loss(head(out.variant_hidden)).loss
        loss.backward()
        model.zero_grad(set_to_none=True)
        head.zero_grad(set_to_none=True)

    hidden = torch.randn(args.pairs, args.m, args.hidden, requires_grad=True)

    def mlc_term() -> None:
        mlc_loss(head(hidden)).loss.backward()
        head.zero_grad(set_to_none=True)
        hidden.grad = None

    fn = {"step-dpo": dpo_step, "step-dpo-mlc": dpo_mlc_step, "mlc-term": mlc_term}[args.worker]
    result = _measure(fn, args.repeats)
    result["rows"] = 2 * args.pairs if args.worker == "step-dpo" else int(batch["input_ids"].shape[0])
    result["width"] = int(batch["input_ids"].shape[1])
    return result


def _run_worker(name: str, argv: list[str]) -> dict[str, float]:
    cmd = [sys.executable, "-m", "raysafe.train.bench_losses", *argv, "--worker", name]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"worker {name} failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------------------ main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    g = p.add_argument_group("log-probs (part 1)")
    g.add_argument("--rows", type=int, default=8, help="sequences (default 8)")
    g.add_argument("--tokens", type=int, default=256, help="tokens per sequence (default 256)")
    g.add_argument("--vocab", type=int, default=262144, help="vocabulary size (default 262144, Gemma 3)")
    g.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16", help="dtype of the logits (default bf16)")
    g.add_argument("--chunk-positions", type=int, default=None, help="positions per float32 chunk (default: 64 MiB)")
    g = p.add_argument_group("MLC step (part 2)")
    g.add_argument("--pairs", type=int, default=2, help="preference pairs B (default 2)")
    g.add_argument("--m", type=int, default=10, help="prompt variants per pair (default 10)")
    g.add_argument("--d", type=int, default=512, help="MLC head width (default 512)")
    g.add_argument("--hidden", type=int, default=640, help="model width (default 640, Gemma 3 270M)")
    g.add_argument("--layers", type=int, default=2, help="decoder layers of the tiny model (default 2)")
    g.add_argument("--model-vocab", type=int, default=262144, help="vocabulary of the tiny model (default 262144)")
    g.add_argument("--prompt-tokens", type=int, default=64, help="prompt characters = bytes (default 64)")
    g.add_argument("--answer-tokens", type=int, default=64, help="answer characters = bytes (default 64)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (median; default 3)")
    p.add_argument("--skip-logprobs", action="store_true", help="skip part 1")
    p.add_argument("--skip-mlc", action="store_true", help="skip part 2")
    p.add_argument("--json", default=None, help="also write all figures to this JSON file")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _logprobs_part(args, argv: list[str]) -> dict:
    """[1] peak memory and time of the label log-probs, naive log_softmax against sequence_logprobs."""
    print(
        f"\n[1] label log-probs: logits [rows={args.rows}, tokens={args.tokens}, vocab={args.vocab}] {args.dtype}"
        f" = {args.rows * args.tokens * args.vocab * (2 if args.dtype == 'bf16' else 4) / 2**20:.0f} MiB"
    )
    print(f"{'pass':<18}{'method':<22}{'peak MiB':>10}{'time s':>10}")
    part1 = {}
    for mode in ("forward", "backward"):
        naive = _run_worker(f"naive-{mode}", argv)
        lean = _run_worker(f"lean-{mode}", argv)
        part1[mode] = {"naive": naive, "sequence_logprobs": lean}
        label = "forward" if mode == "forward" else "forward+backward"
        print(f"{label:<18}{'naive log_softmax':<22}{naive['peak_mib']:>10.0f}{naive['time_s']:>10.3f}")
        print(f"{label:<18}{'sequence_logprobs':<22}{lean['peak_mib']:>10.0f}{lean['time_s']:>10.3f}")
        print(
            f"ratio {label}: peak memory naive/lean = {naive['peak_mib'] / max(lean['peak_mib'], 1e-9):.1f}x,"
            f" time lean/naive = {lean['time_s'] / naive['time_s']:.2f}x"
        )
    return part1


def _mlc_part(args, argv: list[str]) -> dict:
    """[2] one training step with DPO alone against DPO + MLC, and the MLC term alone."""
    print(
        f"\n[2] one training step, tiny Gemma 3 (hidden={args.hidden}, layers={args.layers},"
        f" vocab={args.model_vocab}), B={args.pairs} pairs, m={args.m}, d={args.d}"
    )
    dpo = _run_worker("step-dpo", argv)
    both = _run_worker("step-dpo-mlc", argv)
    term = _run_worker("mlc-term", argv)
    print(f"{'step':<34}{'rows x width':>14}{'peak MiB':>10}{'time s':>10}")
    print(
        f"{'DPO only (answer rows)':<34}{dpo['rows']:>7} x {dpo['width']:<4}{dpo['peak_mib']:>10.0f}"
        f"{dpo['time_s']:>10.3f}"
    )
    print(
        f"{'DPO + MLC (answer + variant rows)':<34}{both['rows']:>7} x {both['width']:<4}"
        f"{both['peak_mib']:>10.0f}{both['time_s']:>10.3f}"
    )
    print(f"{'MLC term alone (head + loss)':<34}{'':>14}{term['peak_mib']:>10.1f}{term['time_s']:>10.4f}")
    print(
        f"ratio: DPO+MLC step / DPO step = {both['time_s'] / dpo['time_s']:.2f}x time,"
        f" {both['peak_mib'] / max(dpo['peak_mib'], 1e-9):.2f}x peak memory;"
        f" MLC term alone = {100 * term['time_s'] / dpo['time_s']:.2f}% of a DPO step"
    )
    return {"dpo": dpo, "dpo_mlc": both, "mlc_term": term}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.worker:
        _fix_malloc()
        fn = _worker_logprobs if args.worker.split("-")[0] in ("naive", "lean") else _worker_step
        print(json.dumps(fn(args)))
        return 0
    if not os.path.exists("/proc/self/clear_refs"):
        raise SystemExit("this benchmark measures peak RSS through /proc/self/clear_refs (Linux only)")
    import torch

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs")
    report: dict[str, object] = {"args": {k: v for k, v in vars(args).items() if k != "worker"}}
    if not args.skip_logprobs:
        report["logprobs"] = _logprobs_part(args, argv)
    if not args.skip_mlc:
        report["mlc"] = _mlc_part(args, argv)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(report, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
