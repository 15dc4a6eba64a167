"""`raysafe bench train`: step time of DPO + MLC against DPO alone, tokens/s against TRL's DPOTrainer, memory per ZeRO stage.

What it measures, each part against a baseline measured in the same run:

1. **DPO + MLC against DPO alone.** raysafe's own step — ``raysafe.train.worker.AlignModule`` forward (policy forward
   over ``[B chosen; B rejected; B·m variants]``, DPO loss, MLC head + loss + diagnostics), backward, gradient clipping,
   optimiser step — in one process with plain PyTorch (no DeepSpeed: ``torch.optim.AdamW`` built as the worker builds
   it, ``clip_grad_norm_`` for DeepSpeed's ``gradient_clipping``). DPO alone is the same module with the MLC term off
   (the variant rows are then dropped from the pass, as on raysafe's MLC-off steps). Both run on the same model and
   the same collated batches of the bundled fixtures (``preference_pairs`` joined to ``safety_prompts`` variants in
   m = 10 languages by ``raysafe.train.data.load_samples``, collated by ``PreferenceCollator``); reference log-probs
   are precomputed once with the initial weights, as raysafe does by default.
2. **Tokens/s against TRL.** ``trl.DPOTrainer`` trains a copy of the same initial model on the same English pairs, in
   the same order (``train_sampling_strategy="sequential"``), with the same batch size, ``max_length``, β, learning
   rate, clipping and number of steps, ``precompute_ref_log_probs=True`` (no reference model in memory, like raysafe),
   no gradient checkpointing (TRL's default is on; raysafe's is off), float32 on the CPU, ``report_to="none"``, no
   saving and no logging. The three series are **interleaved step by step** in one process — a TRL optimiser step,
   then raysafe DPO and raysafe DPO + MLC on the same pairs (their order alternating) — so a load change on a shared
   machine hits all three alike. Tokens = non-pad tokens of the chosen + rejected sequences (prompt + answer) of a
   step's pairs, for every series (variant rows are not counted: DPO + MLC does more work for the same tokens);
   tokens/s = tokens / seconds of optimiser steps (forward + backward + clipping + optimiser step; TRL: its
   ``on_step_begin`` → ``on_step_end``), summed over the measured steps after ``--warmup`` steps; batch preparation,
   initialisation and the reference pass are excluded on both sides.
3. **Memory per worker for ZeRO-0/2/3 with 2 workers.** ``raysafe.train.flow.run_train`` with 2 CPU workers on a tiny
   random Llama (``--mem-hidden``, ``--mem-layers``), a few steps per stage. Every worker step reports ``memory_mb``
   (process RSS on the CPU, ``torch.cuda.max_memory_allocated`` on a GPU); the bench wraps the worker loop to keep
   each worker's per-step ``memory_mb`` (it passes ``ray.train.report`` through unchanged), its RSS before the model
   is loaded (libraries imported) and its peak RSS (VmHWM). Printed next to the model + gradient + optimiser state
   expected per worker from the ZeRO partitioning formulas of docs/training.md with float32 sizes (CPU workers train
   in fp32): stage 0 16Ψ (4Ψ weights + 4Ψ gradients + 8Ψ Adam moments), stage 2 4Ψ + 16Ψ/N (ZeRO keeps a float32
   master partition too: 12Ψ/N optimiser state), stage 3 20Ψ/N.

Model: by default a tiny random Gemma 3 with Gemma-3-270M's width (hidden 640, vocabulary 262,144, ``--layers``
decoder layers) and the packaged Gemma 3 tokenizer (real token counts; ``--tokenizer byte`` for the byte-level test
tokenizer); ``--model gemma3-270m`` (or any model path) trains the real model. ``--profile-mlc`` adds a breakdown of
the MLC step (decoder over answer rows, over variant rows, to the MLC layer only, LM head, MLC term).

Example::

    raysafe bench train                                 # defaults, about 10 minutes on 2 CPU cores
    raysafe bench train --model gemma3-270m --steps 6 --skip-memory
    raysafe bench train --device cuda --precision bf16 --model gemma3-270m --pairs 8 --skip-memory
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LANGS = ["en", "zh", "ru", "ja", "ar", "bn", "sw", "ur", "ps", "ku"]


# -------------------------------------------------------------------------------------------------- helpers
def _status_kib(key: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key):
                return int(line.split()[1])
    return 0


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _tokenizer(args):
    from raysafe.config import ModelSpec
    from raysafe.models.loading import load_tokenizer
    from raysafe.models.tiny import tiny_tokenizer

    if args.model:
        return load_tokenizer(ModelSpec(path=args.model))
    if args.tokenizer == "byte":
        return tiny_tokenizer(padding_side="left", chat_template=True)
    try:
        return load_tokenizer(ModelSpec(path="gemma3-270m"))
    except Exception as e:  # the packaged model is an optional extra
        print(f"(packaged Gemma 3 tokenizer unavailable: {e}; using the byte-level tokenizer)", file=sys.stderr)
        return tiny_tokenizer(padding_side="left", chat_template=True)


def _policy(args, device):
    """(model in train mode on ``device``, label)."""
    import torch
    from transformers import AutoModelForCausalLM

    if args.model:
        from raysafe.config import ModelSpec
        from raysafe.models.loading import load_causal_lm

        model = load_causal_lm(ModelSpec(path=args.model, dtype="float32", attn_implementation=args.attn), device)
        return model.train(), args.model
    from raysafe.models.tiny import tiny_config

    torch.manual_seed(args.seed)
    config = tiny_config("gemma3", num_layers=args.layers, hidden=args.hidden, vocab_size=args.vocab)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation=args.attn)
    label = f"tiny random Gemma 3 (hidden {args.hidden}, {args.layers} layers, vocab {args.vocab})"
    return model.to(device).train(), label


def _n_params(module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


# ------------------------------------------------------------------------------------------- parts 1 and 2
def _steps_config(args):
    """The TrainConfig raysafe's side of parts 1 and 2 runs under (DPO + MLC, constant learning rate)."""
    from raysafe.train.config import TrainConfig

    return TrainConfig.model_validate(
        {
            "model": {"path": args.model or "tiny-gemma3"},
            "data": {"max_length": args.max_length, "max_prompt_length": args.max_prompt_length},
            "mixture": {"languages": LANGS[: max(args.m, 2)] if args.m <= len(LANGS) else LANGS, "m": args.m},
            "loss": {"name": "dpo", "beta": args.beta},
            "mlc": {"weight": 0.8, "layer": 0.5, "d": args.d, "every_k": 2},
            "optim": {"lr": args.lr, "micro_batch": args.pairs, "grad_accum": 1, "clip": 1.0, "schedule": "constant"},
            "seed": args.seed,
        }
    )


def _bench_rows(cfg, pairs: int, steps: int) -> list[dict]:
    """The first ``steps · pairs`` joined samples of the bundled fixtures; refuses when there are fewer."""
    from raysafe.train.data import load_samples

    samples = load_samples(cfg.data, cfg.mixture, cfg.seed)
    if samples.height < steps * pairs:
        raise SystemExit(f"{samples.height} pairs cannot fill {steps} steps of {pairs} pairs; lower --steps/--pairs")
    return samples.head(steps * pairs).to_dicts()


def _collate_batches(collator, rows: list[dict], pairs: int, steps: int, device) -> list[dict]:
    """One collated batch of ``pairs`` samples per step, its tensors on ``device``."""
    import torch

    batches = []
    for i in range(steps):
        chunk = rows[i * pairs : (i + 1) * pairs]
        batch = collator(
            [
                {
                    "group_id": r["group_id"],
                    "prompt": r["prompt"],
                    "chosen": r["chosen"],
                    "rejected": r["rejected"],
                    "variants": list(zip(r["variant_langs"], r["variant_texts"])),
                }
                for r in chunk
            ]
        )
        batches.append({k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()})
    return batches


def _reference_logps(policy, batches: list[dict], autocast) -> tuple[list[tuple], float]:
    """(chosen, rejected) reference log-probs of every batch under the initial weights, and the seconds it took."""
    import torch

    from raysafe.train.forward import policy_forward

    t0 = time.perf_counter()
    refs = []
    with torch.inference_mode(), autocast:
        for b in batches:
            out = policy_forward(policy, b, None)
            refs.append((out.chosen_logps.float().clone(), out.rejected_logps.float().clone()))
    return refs, time.perf_counter() - t0


def _answer_widths(batches: list[dict]) -> list[int]:
    """Width of each batch's answer rows once trimmed to their attended columns (what policy_forward runs without
    MLC)."""
    answer_width = []
    for b in batches:
        cols = b["attention_mask"][: 2 * int(b["n_pairs"])].any(0).nonzero().flatten()
        answer_width.append(int(cols[-1] - cols[0] + 1))
    return answer_width


class _RaysafeSteps:
    """raysafe's optimiser step with plain PyTorch (AlignModule forward, backward, clipping, AdamW), timed."""

    def __init__(self, policy, cfg, batches: list[dict], refs: list[tuple], steps: int, device, autocast):
        import torch

        from raysafe.models.layers import num_layers
        from raysafe.train.ds_config import lr_lambda
        from raysafe.train.mlc import MLCHead
        from raysafe.train.worker import AlignModule, param_groups

        self.cfg, self.batches, self.refs, self.device, self.autocast = cfg, batches, refs, device, autocast
        self.answer_width = _answer_widths(batches)
        self.layer = cfg.mlc.resolve_layer(num_layers(policy))
        head = MLCHead(policy.config.hidden_size, cfg.mlc.d, cfg.mlc.head).to(device)
        self.module = AlignModule(policy, head, cfg, self.layer)
        self.params = [p for p in self.module.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            param_groups(self.module, cfg), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda("constant", steps, 0.0))

    def step(self, i: int, mlc: bool) -> dict:
        import torch

        from raysafe.train.worker import _scalar

        b, device = self.batches[i], self.device
        _sync(device)
        t_a, c_a = time.perf_counter(), time.process_time()
        with self.autocast:
            loss, metrics = self.module(b, self.refs[i][0], self.refs[i][1], mlc)
        _sync(device)
        t_b = time.perf_counter()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, self.cfg.optim.clip)
        _sync(device)
        t_c = time.perf_counter()
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        vals = {k: _scalar(v) for k, v in metrics.items()}  # what the worker logs every step
        _sync(device)
        t_d, c_d = time.perf_counter(), time.process_time()
        return {
            "step_s": t_d - t_a,
            "cpu_s": c_d - c_a,
            "fwd_s": t_b - t_a,
            "bwd_s": t_c - t_b,
            "opt_s": t_d - t_c,
            "tokens": int(b["attention_mask"][: 2 * int(b["n_pairs"])].sum()),
            "loss": vals["loss/total"],
            "rows": int(b["input_ids"].shape[0]) if mlc else 2 * int(b["n_pairs"]),
            "width": int(b["input_ids"].shape[1]) if mlc else self.answer_width[i],
        }


def _trl_data(rows: list[dict], conversational: bool) -> dict:
    """The same English pairs in the same order, as TRL's dataset columns."""
    if conversational:
        return {
            "prompt": [[{"role": "user", "content": r["prompt"]}] for r in rows],
            "chosen": [[{"role": "assistant", "content": r["chosen"]}] for r in rows],
            "rejected": [[{"role": "assistant", "content": r["rejected"]}] for r in rows],
        }
    return {k: [r[k] for r in rows] for k in ("prompt", "chosen", "rejected")}


def _trl_args(args, steps: int, bf16: bool, device):
    """TRL's DPOConfig matching raysafe's step (one flat list of settings)."""
    import trl

    out_dir = tempfile.mkdtemp(prefix="raysafe-bench-trl-")
    return trl.DPOConfig(
        output_dir=out_dir,
        per_device_train_batch_size=args.pairs,
        gradient_accumulation_steps=1,
        max_steps=steps,
        num_train_epochs=1,
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        beta=args.beta,
        loss_type=["sigmoid"],
        max_length=args.max_length,
        precompute_ref_log_probs=True,
        precompute_ref_batch_size=args.pairs,
        gradient_checkpointing=False,
        activation_checkpointing=False,
        bf16=bf16,
        fp16=False,
        use_cpu=device.type == "cpu",
        report_to="none",
        save_strategy="no",
        logging_strategy="no",
        eval_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
        train_sampling_strategy="sequential",
        seed=args.seed,
        **({"optim": args.trl_optim} if args.trl_optim else {}),
    )


def _counting_dpo_trainer(step_tokens: list[int], step_shapes: list[tuple[int, int]]):
    """trl.DPOTrainer that appends each training step's non-pad token count and batch shape to the given lists."""
    import trl

    class CountingDPOTrainer(trl.DPOTrainer):
        def training_step(self, model, inputs, num_items_in_batch=None):  # noqa: D102
            step_tokens.append(int(inputs["attention_mask"].sum()))  # chosen + rejected rows, non-pad
            step_shapes.append(tuple(inputs["input_ids"].shape))
            return super().training_step(model, inputs, num_items_in_batch)

    return CountingDPOTrainer


def _interleave_callback(raysafe: _RaysafeSteps, series: dict, step_tokens: list, step_shapes: list, steps: int):
    """A TrainerCallback that times TRL's optimiser steps and, after each, runs raysafe's two steps on the same
    pairs (their order alternating), appending to ``series``."""
    from transformers import TrainerCallback

    device = raysafe.device

    class Interleave(TrainerCallback):
        """Times TRL's optimiser steps; after each, runs raysafe's two steps on the same pairs."""

        def on_step_begin(self, a, state, control, **kw):
            _sync(device)
            self.t = [time.perf_counter()]
            self.c = time.process_time()

        def on_pre_optimizer_step(self, a, state, control, **kw):
            _sync(device)
            self.t.append(time.perf_counter())

        def on_optimizer_step(self, a, state, control, **kw):
            _sync(device)
            self.t.append(time.perf_counter())

        def on_step_end(self, a, state, control, **kw):
            _sync(device)
            t = self.t + [time.perf_counter()]
            cpu = time.process_time() - self.c
            i = state.global_step - 1
            series["trl"].append(
                {
                    "step_s": t[-1] - t[0],
                    "cpu_s": cpu,
                    "fwd_bwd_s": t[1] - t[0],
                    "opt_s": t[-1] - t[1],
                    "tokens": step_tokens[-1],
                    "rows": step_shapes[-1][0],
                    "width": step_shapes[-1][1],
                }
            )
            order = (False, True) if i % 2 == 0 else (True, False)
            for mlc in order:
                series["dpo_mlc" if mlc else "dpo"].append(raysafe.step(i, mlc))
            print(
                f"  step {i + 1}/{steps}: TRL {series['trl'][-1]['step_s']:.2f} s, raysafe DPO "
                f"{series['dpo'][-1]['step_s']:.2f} s, DPO+MLC {series['dpo_mlc'][-1]['step_s']:.2f} s",
                file=sys.stderr,
                flush=True,
            )

    return Interleave()


def _series_summary(per_step: list[dict], warmup: int) -> dict:
    """Medians and token rates of one series over its steps after ``warmup``."""
    xs = per_step[warmup:]
    total_s = sum(x["step_s"] for x in xs)
    total_tok = sum(x["tokens"] for x in xs)
    s = {
        "step_s_median": statistics.median(x["step_s"] for x in xs),
        "tokens_per_step": total_tok / len(xs),
        "tokens_per_s": total_tok / total_s,
        "steps": len(xs),
        "per_step": per_step,
        "cpu_s_median": statistics.median(x["cpu_s"] for x in xs),
        "tokens_per_cpu_s": total_tok / sum(x["cpu_s"] for x in xs),
    }
    for k in ("fwd_s", "bwd_s", "opt_s", "fwd_bwd_s"):
        if k in xs[0]:
            s[k + "_median"] = statistics.median(x[k] for x in xs)
    if "rows" in xs[0]:
        s["rows_x_width"] = (
            f"{statistics.median(x['rows'] for x in xs):.0f} x {statistics.median(x['width'] for x in xs):.0f}"
        )
    return s


def _train_trl_interleaved(args, rows, tok, trl_policy, collator, raysafe: _RaysafeSteps, steps: int, bf16: bool):
    """Trains TRL's DPOTrainer on the same pairs, raysafe's two steps run after each of its steps.

    Returns (per-step series of trl, dpo and dpo_mlc; TRL's init seconds, optimiser name and checkpointing flag)."""
    from datasets import Dataset

    series: dict[str, list[dict]] = {"trl": [], "dpo": [], "dpo_mlc": []}
    data = _trl_data(rows, collator.use_chat_template)
    dpo_args = _trl_args(args, steps, bf16, raysafe.device)
    step_tokens: list[int] = []
    step_shapes: list[tuple[int, int]] = []
    t0 = time.perf_counter()
    trainer = _counting_dpo_trainer(step_tokens, step_shapes)(
        model=trl_policy,
        args=dpo_args,
        train_dataset=Dataset.from_dict(data),
        processing_class=tok,
        callbacks=[_interleave_callback(raysafe, series, step_tokens, step_shapes, steps)],
    )
    trl_init_s = time.perf_counter() - t0
    trl_run = {
        "init_s": trl_init_s,
        "optim": str(getattr(trainer.args.optim, "value", trainer.args.optim)),
        "checkpointing": bool(getattr(trainer.model, "is_activation_checkpointing", False)),
    }
    trainer.train()
    return series, trl_run


def run_steps(args) -> dict:
    import copy

    import torch
    import trl

    from raysafe.train.worker import make_collator

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    bf16 = args.precision == "bf16" or (args.precision == "auto" and device.type == "cuda")
    steps = args.warmup + args.steps
    cfg = _steps_config(args)
    rows = _bench_rows(cfg, args.pairs, steps)

    tok = _tokenizer(args)
    t0 = time.perf_counter()
    policy, label = _policy(args, device)
    if len(tok) > policy.config.vocab_size:
        raise SystemExit(f"tokenizer has {len(tok)} tokens, the model's vocabulary {policy.config.vocab_size}")
    trl_policy = copy.deepcopy(policy)  # the same initial weights for TRL
    load_s = time.perf_counter() - t0

    # ---- raysafe: collated batches, reference log-probs precomputed with the initial weights
    collator = make_collator(cfg, tok)
    batches = _collate_batches(collator, rows, args.pairs, steps, device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
    refs, ref_s = _reference_logps(policy, batches, autocast)
    raysafe = _RaysafeSteps(policy, cfg, batches, refs, steps, device, autocast)
    # ---- TRL: the same English pairs in the same order, raysafe's steps interleaved
    series, trl_run = _train_trl_interleaved(args, rows, tok, trl_policy, collator, raysafe, steps, bf16)

    report = {
        "model": label,
        "params": _n_params(policy),
        "mlc_layer": raysafe.layer,
        "device": str(device),
        "precision": "bf16 autocast" if bf16 else "fp32",
        "threads": torch.get_num_threads(),
        "load_s": load_s,
        "raysafe_reference_pass_s": ref_s,
        "trl_init_s (incl. tokenising + reference pass)": trl_run["init_s"],
        "trl": {
            "version": trl.__version__,
            "optim": trl_run["optim"],
            "precompute_ref_log_probs": True,
            "gradient_checkpointing": trl_run["checkpointing"],
            "report_to": "none",
            "sampling": "sequential",
        },
        "raysafe_optim": "torch.optim.AdamW (defaults) + clip_grad_norm_(1.0), no DeepSpeed",
        "series": {k: _series_summary(v, args.warmup) for k, v in series.items()},
    }
    if args.profile_mlc:
        report["profile_mlc"] = profile_mlc(raysafe.module, batches, refs, args.profile_repeats, device, autocast)
    return report


def _rows_pass(decoder, b: dict, rows: slice, trim: bool):
    """Last hidden states of the decoder body over ``rows`` of batch ``b`` (trimmed to their attended columns)."""
    ids, mask, pos = b["input_ids"][rows], b["attention_mask"][rows], b["position_ids"][rows]
    if trim:
        cols = mask.any(0).nonzero().flatten()
        span = slice(int(cols[0]), int(cols[-1]) + 1)
        ids, mask, pos = ids[:, span], mask[:, span], pos[:, span]
    return decoder(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).last_hidden_state


def _variant_hidden(policy, b: dict, layer: int, upto_layer: bool, trim: bool):
    """Pooled hidden states at ``layer`` of the variant rows of batch ``b`` as (n, m, hidden); ``upto_layer`` stops
    the decoder at the MLC layer, ``trim`` runs the variant rows at their own padded width."""
    from raysafe.models.layers import decoder_body, hidden_state_hooks
    from raysafe.train.forward import pool_hidden

    decoder = decoder_body(policy)
    n, m = int(b["n_pairs"]), int(b["m"])
    captured: dict = {}
    rows = slice(2 * n, None)
    mask = b["attention_mask"][rows]
    last = b["variant_last_index"]
    if trim:
        cols = mask.any(0).nonzero().flatten()
        last = last - int(cols[0])
    with hidden_state_hooks(policy, [layer], captured.__setitem__):
        ids, am, pos = b["input_ids"][rows], mask, b["position_ids"][rows]
        if trim:
            span = slice(int(cols[0]), int(cols[-1]) + 1)
            ids, am, pos = ids[:, span], am[:, span], pos[:, span]
        layers = decoder.layers
        if upto_layer:
            decoder.layers = layers[: max(layer, 1)]
        try:
            decoder(input_ids=ids, attention_mask=am, position_ids=pos, use_cache=False)
        finally:
            decoder.layers = layers
    return pool_hidden(captured[layer], am, last, "last").reshape(n, m, -1)


def _median_time(fn, repeats: int, device, module) -> float:
    """Median seconds of ``repeats`` runs of ``fn`` after one untimed run; the module's gradients are dropped after."""
    fn()
    ts = []
    for _ in range(repeats):
        _sync(device)
        t = time.perf_counter()
        fn()
        _sync(device)
        ts.append(time.perf_counter() - t)
    module.policy.zero_grad(set_to_none=True)
    module.head.zero_grad(set_to_none=True)
    return statistics.median(ts)


def profile_mlc(module, batches, refs, repeats: int, device, autocast) -> dict:
    """Forward + backward time of the pieces of the MLC step on the first batch, medians of ``repeats`` runs.

    ``variant rows to layer L, own width`` is what the pass over the variant rows would cost if it ran separately
    from the answer rows, trimmed to the variant rows' own padded width and stopped at the MLC layer (nothing above
    that layer feeds the MLC loss); the bench checks that it yields the same pooled hidden states.
    """
    import torch

    from raysafe.models.layers import decoder_body
    from raysafe.train.forward import policy_forward
    from raysafe.train.mlc import consistency_loss

    policy, head, layer = module.policy, module.head, module.mlc_layer
    b = batches[0]
    resp = 2 * int(b["n_pairs"])
    decoder = decoder_body(policy)

    def timed(fn) -> float:
        return _median_time(fn, repeats, device, module)

    def mlc_term(h: torch.Tensor) -> torch.Tensor:
        return consistency_loss(head(h.float()), module.mlc).loss

    def decoder_loss(rows: slice, trim: bool) -> None:
        _rows_pass(decoder, b, rows, trim).float().pow(2).mean().backward()

    res: dict[str, float] = {}
    with autocast:
        res["DPO step forward+backward (answer rows)"] = timed(
            lambda: module(b, refs[0][0], refs[0][1], False)[0].backward()
        )
        res["DPO+MLC step forward+backward (today: one pass over all rows)"] = timed(
            lambda: module(b, refs[0][0], refs[0][1], True)[0].backward()
        )
        res["  decoder only, all rows, full depth, joint width"] = timed(lambda: decoder_loss(slice(None), False))
        res["  decoder only, answer rows, full depth, own width"] = timed(lambda: decoder_loss(slice(0, resp), True))
        res["  decoder only, variant rows, full depth, joint width"] = timed(
            lambda: decoder_loss(slice(resp, None), False)
        )
        res["  variant rows to layer L, own width + MLC term"] = timed(
            lambda: mlc_term(_variant_hidden(policy, b, layer, True, True)).backward()
        )
        pooled = _variant_hidden(policy, b, layer, False, False).detach()
        res["  MLC term alone (head + loss on pooled states)"] = timed(
            lambda: mlc_term(pooled.clone().requires_grad_(True)).backward()
        )
        with torch.no_grad():
            today = policy_forward(policy, b, layer).variant_hidden.float()
            proposed = _variant_hidden(policy, b, layer, True, True).float()
        res["max |pooled hidden today - proposed|"] = float((today - proposed).abs().max())
    res["variant rows x width (joint)"] = f"{b['input_ids'].shape[0] - resp} x {b['input_ids'].shape[1]}"
    return res


# ---------------------------------------------------------------------------------------------------- part 3
def measured_train_loop(config: dict) -> None:
    """``raysafe.train.worker.train_loop`` plus this worker's RSS before the model exists, its per-step
    ``memory_mb`` (read off ``ray.train.report``, which is passed through unchanged), its peak RSS so far at each
    step and at the end, written as JSON next to the run (``bench_memory_rank{R}.json`` under the storage path).

    glibc's mmap threshold is fixed at 1 MiB first (as in ``raysafe bench losses``), so freed tensors go back to the
    OS and RSS follows the live tensors instead of keeping every freed buffer of model loading in the heap."""
    import ctypes

    import deepspeed  # noqa: F401  (imported before the baseline, as the worker loop imports it)
    import ray.train
    import transformers  # noqa: F401

    from raysafe.train import worker

    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD = 1 MiB
    except OSError:
        pass
    rank = ray.train.get_context().get_world_rank()
    baseline_mb = _status_kib("VmRSS:") / 1024
    per_step: list[float] = []
    peak_at_step: list[float] = []
    original = ray.train.report

    def report(metrics, *a, **kw):
        if "memory_mb" in metrics:
            per_step.append(float(metrics["memory_mb"]))
            peak_at_step.append(_status_kib("VmHWM:") / 1024)
        return original(metrics, *a, **kw)

    ray.train.report = report
    try:
        worker.train_loop(config)
    finally:
        ray.train.report = original
        out = Path(config["cfg"]["checkpoint"]["storage_path"]) / f"bench_memory_rank{rank}.json"
        out.write_text(
            json.dumps(
                {
                    "rank": rank,
                    "baseline_rss_mb": baseline_mb,
                    "memory_mb": per_step,
                    "peak_rss_mb_at_step": peak_at_step,
                    "peak_rss_mb": _status_kib("VmHWM:") / 1024,
                }
            )
        )


def _memory_config(args, model_dir: Path, d: int, stage: int, storage: Path, n: int):
    """The TrainConfig of one ZeRO stage of part 3 (one flat list of settings)."""
    from raysafe.train.config import TrainConfig

    return TrainConfig.model_validate(
        {
            "model": {"path": str(model_dir), "name": "tiny-llama"},
            "data": {"max_length": args.mem_max_length, "max_prompt_length": args.mem_max_length * 3 // 4},
            "mixture": {"languages": LANGS, "m": 4},
            "loss": {"name": "dpo", "beta": 0.1},
            "mlc": {"weight": 0.8, "layer": 0.5, "d": d, "every_k": 2},
            "optim": {
                "lr": 1e-4,
                "epochs": 1,
                "micro_batch": 1,
                "grad_accum": 1,
                "max_steps": args.mem_steps,
                "warmup_ratio": 0.0,
            },
            "deepspeed": {"zero_stage": stage},
            "checkpoint": {
                "every_n_steps": 10**6,
                "storage_path": str(storage),
                "max_failures": 0,
                "name": f"bench-zero{stage}",
            },
            "ray": {"num_workers": n, "torch_threads": 1, "cpus_per_worker": 1},
            "tracking": {"enabled": False},
            "seed": args.seed,
        }
    )


def _measure_stage(args, model_dir: Path, work: Path, stage: int, d: int, psi: int, n: int) -> dict:
    """Trains one ZeRO stage with the measured worker loop and collects what every worker wrote."""
    from raysafe.train import flow

    storage = work / f"zero{stage}"
    storage.mkdir()
    cfg = _memory_config(args, model_dir, d, stage, storage, n)
    t0 = time.perf_counter()
    res = flow.run_train(cfg, progress=False)
    wall = time.perf_counter() - t0
    workers = [json.loads((storage / f"bench_memory_rank{r}.json").read_text()) for r in range(n)]
    print(
        f"  ZeRO-{stage}: {res.steps} steps in {wall:.0f} s; peak RSS per worker "
        f"{', '.join(str(round(w['peak_rss_mb'])) for w in workers)} MiB",
        file=sys.stderr,
        flush=True,
    )
    return {
        "steps": res.steps,
        "wall_s": wall,
        "workers": workers,
        "rank0_final_memory_mb": res.metrics.get("memory_mb"),
        "expected_state_mb": expected_state_bytes(stage, psi, n) / 2**20,
    }


def run_memory(args) -> dict:
    import shutil

    import ray
    import torch
    from transformers import AutoModelForCausalLM

    from raysafe.models.tiny import save_tiny, tiny_config
    from raysafe.train import flow

    work = Path(tempfile.mkdtemp(prefix="raysafe-bench-mem-"))
    model_dir = save_tiny(work / "model", "llama", hidden=args.mem_hidden, num_layers=args.mem_layers)
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(
            tiny_config("llama", hidden=args.mem_hidden, num_layers=args.mem_layers)
        )
    # MLC head width: small enough that ZeRO-3 keeps the head whole (hidden·d + d below DeepSpeed's
    # stage3_param_persistence_threshold of 1e4 set by raysafe.train.ds_config), as in the figures of
    # docs/benchmarks.md (a partitioned head exports fine since raysafe.train.export builds the head afresh from the
    # gathered weights); the head is negligible for memory either way.
    d = max(1, 9_999 // (args.mem_hidden + 1))
    psi = _n_params(meta) + (args.mem_hidden * d + d)  # policy + MLC head (hidden -> d, with bias)
    n = 2
    ray.init(num_cpus=2, include_dashboard=False, ignore_reinit_error=True, log_to_driver=False)
    original = flow.train_loop
    flow.train_loop = measured_train_loop
    stages = {}
    try:
        for stage in args.mem_stages:
            stages[stage] = _measure_stage(args, model_dir, work, stage, d, psi, n)
    finally:
        flow.train_loop = original
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)
    return {
        "model": f"tiny random Llama (hidden {args.mem_hidden}, {args.mem_layers} layers, byte vocabulary)",
        "params": psi,
        "mlc_d": d,
        "workers": n,
        "max_length": args.mem_max_length,
        "stages": stages,
    }


def expected_state_bytes(stage: int, psi: int, n: int) -> float:
    """Weights + gradients + optimiser state per worker, float32 (docs/training.md's table with fp32 sizes)."""
    if stage == 0:
        return 16 * psi  # 4 weights + 4 gradients + 8 Adam moments (torch AdamW, no master copy)
    if stage == 1:
        return 8 * psi + 12 * psi / n
    if stage == 2:
        return 4 * psi + 16 * psi / n  # 4 weights + 4/N gradients + 12/N (fp32 master + 2 moments)
    return 20 * psi / n


EXPECTED_FORMULA = {0: "16Ψ", 1: "8Ψ + 12Ψ/N", 2: "4Ψ + 16Ψ/N", 3: "20Ψ/N"}


# ------------------------------------------------------------------------------------------------------ main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawTextHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    g = p.add_argument_group("model and data (parts 1 and 2)")
    g.add_argument(
        "--model",
        default=None,
        help="a model path or the packaged alias gemma3-270m\n(default: tiny random Gemma 3, see --hidden)",
    )
    g.add_argument("--hidden", type=int, default=640, help="tiny model width (default 640, Gemma 3 270M)")
    g.add_argument("--layers", type=int, default=4, help="tiny model decoder layers (default 4)")
    g.add_argument("--vocab", type=int, default=262144, help="tiny model vocabulary (default 262144, Gemma 3)")
    g.add_argument(
        "--tokenizer",
        choices=["gemma3", "byte"],
        default="gemma3",
        help="tokenizer of the tiny model: the packaged Gemma 3 one (default) or the byte-level one",
    )
    g.add_argument("--attn", choices=["sdpa", "eager"], default="sdpa", help="attention implementation (default sdpa)")
    g.add_argument("--pairs", type=int, default=2, help="preference pairs per step B (default 2)")
    g.add_argument("--m", type=int, default=10, help="prompt variants per pair (default 10)")
    g.add_argument("--d", type=int, default=512, help="MLC head width (default 512)")
    g.add_argument("--max-length", type=int, default=512, help="max tokens per sequence, both trainers (default 512)")
    g.add_argument("--max-prompt-length", type=int, default=256, help="raysafe's prompt cut-off (default 256)")
    g.add_argument("--beta", type=float, default=0.1, help="DPO beta (default 0.1)")
    g.add_argument("--lr", type=float, default=1e-6, help="learning rate, constant (default 1e-6)")
    g = p.add_argument_group("timing (parts 1 and 2)")
    g.add_argument("--steps", type=int, default=6, help="measured optimiser steps per series (default 6)")
    g.add_argument("--warmup", type=int, default=2, help="leading steps left out of the figures (default 2)")
    g.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    g.add_argument(
        "--precision",
        choices=["auto", "fp32", "bf16"],
        default="auto",
        help="auto: bf16 autocast on cuda, fp32 on cpu; bf16 = autocast for both trainers",
    )
    g.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    g.add_argument("--trl-optim", default=None, help="TRL's optim (default: its own, adamw_torch_fused on torch>=2.8)")
    g.add_argument("--profile-mlc", action="store_true", help="also break the MLC step down into its pieces")
    g.add_argument("--profile-repeats", type=int, default=2, help="runs per piece of --profile-mlc (median; default 2)")
    g = p.add_argument_group("memory per ZeRO stage (part 3)")
    g.add_argument("--mem-hidden", type=int, default=1024, help="tiny Llama width (default 1024)")
    g.add_argument("--mem-layers", type=int, default=6, help="tiny Llama layers (default 6, about 57 M parameters)")
    g.add_argument("--mem-steps", type=int, default=3, help="optimiser steps per stage (default 3)")
    g.add_argument("--mem-max-length", type=int, default=96, help="max tokens per sequence (default 96)")
    g.add_argument(
        "--mem-stages", type=int, nargs="+", default=[0, 2, 3], choices=[0, 1, 2, 3], help="ZeRO stages (default 0 2 3)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    p.add_argument("--skip-steps", action="store_true", help="skip parts 1 and 2")
    p.add_argument("--skip-memory", action="store_true", help="skip part 3")
    p.add_argument("--json", default=None, help="also write all figures to this JSON file")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _run_worker(name: str, argv: list[str]) -> dict:
    """Run one part in a fresh process (its progress goes to stderr, its figures come back as JSON)."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as fh:
        path = fh.name
    cmd = [sys.executable, "-m", "raysafe.train.bench", *argv, "--worker", name, "--json", path]
    proc = subprocess.run(cmd, stdout=sys.stderr)
    if proc.returncode != 0:
        raise SystemExit(f"benchmark part {name!r} failed (exit {proc.returncode}); its output is above")
    try:
        return json.loads(Path(path).read_text())
    finally:
        os.unlink(path)


def _print_steps(r: dict, args) -> None:
    s = r["series"]
    print(
        f"\n[1, 2] one optimiser step: {r['model']}, {r['params'] / 1e6:.1f} M trainable parameters; "
        f"B={args.pairs} pairs, m={args.m}, MLC layer {r['mlc_layer']}, d={args.d}, max_length {args.max_length}"
    )
    print(
        f"       {r['device']} {r['precision']}, {r['threads']} threads; {s['trl']['steps']} measured steps after "
        f"{args.warmup} warm-up, interleaved step by step (TRL, raysafe DPO, raysafe DPO+MLC on the same pairs)"
    )
    t = r["trl"]
    print(
        f"       TRL {t['version']} DPOTrainer: precompute_ref_log_probs=True, optim {t['optim']}, gradient "
        f"checkpointing {'on' if t['gradient_checkpointing'] else 'off'}, report_to none; raysafe: AlignModule + "
        f"{r['raysafe_optim']}"
    )
    print(
        f"{'series':<28}{'rows x width':>13}{'step s':>9}{'fwd s':>8}{'bwd s':>8}{'optim s':>9}"
        f"{'tok/step':>10}{'tokens/s':>10}{'CPU s':>8}{'tok/CPU s':>11}"
    )
    names = {"trl": "TRL DPOTrainer (DPO)", "dpo": "raysafe DPO", "dpo_mlc": f"raysafe DPO + MLC (m={args.m})"}
    for k, label in names.items():
        x = s[k]
        fwd = f"{x['fwd_s_median']:.3f}" if "fwd_s_median" in x else f"{x['fwd_bwd_s_median']:.3f}*"
        bwd = f"{x['bwd_s_median']:.3f}" if "bwd_s_median" in x else "*"
        print(
            f"{label:<28}{x.get('rows_x_width', ''):>13}{x['step_s_median']:>9.3f}{fwd:>8}{bwd:>8}"
            f"{x['opt_s_median']:>9.3f}{x['tokens_per_step']:>10.0f}{x['tokens_per_s']:>10.1f}"
            f"{x['cpu_s_median']:>8.2f}{x['tokens_per_cpu_s']:>11.1f}"
        )
    print(
        "  (medians over the measured steps; tokens/s = all measured tokens / all measured step seconds; CPU s ="
        " process CPU time of a step, all threads;\n   * TRL: forward + backward + clipping together; optim ="
        " optimiser step + scheduler + zero_grad; raysafe bwd includes clipping)"
    )
    ratio = s["dpo_mlc"]["step_s_median"] / s["dpo"]["step_s_median"]
    print(
        f"ratio step time raysafe DPO+MLC / DPO = {ratio:.2f}x (aim <= 1.6x); with the paper's schedule (MLC every "
        f"2nd step) {(1 + ratio) / 2:.2f}x"
    )
    print(
        f"ratio tokens/s raysafe DPO / TRL = {s['dpo']['tokens_per_s'] / s['trl']['tokens_per_s']:.2f}x (aim >= 1x);"
        f" raysafe DPO+MLC / TRL = {s['dpo_mlc']['tokens_per_s'] / s['trl']['tokens_per_s']:.2f}x"
    )
    print(
        f"  same ratios on CPU time (less sensitive to other load): step DPO+MLC / DPO = "
        f"{s['dpo_mlc']['cpu_s_median'] / s['dpo']['cpu_s_median']:.2f}x; tokens per CPU-second raysafe DPO / TRL"
        f" = {s['dpo']['tokens_per_cpu_s'] / s['trl']['tokens_per_cpu_s']:.2f}x, DPO+MLC / TRL = "
        f"{s['dpo_mlc']['tokens_per_cpu_s'] / s['trl']['tokens_per_cpu_s']:.2f}x"
    )
    print(
        f"  (set-up, not timed above: model {r['load_s']:.1f} s, raysafe reference pass "
        f"{r['raysafe_reference_pass_s']:.1f} s, TRL init incl. tokenising + reference pass "
        f"{r['trl_init_s (incl. tokenising + reference pass)']:.1f} s)"
    )
    if "profile_mlc" in r:
        print("\nMLC step breakdown (first batch, forward + backward, median s):")
        for k, v in r["profile_mlc"].items():
            print(f"  {k:<66}{v:>10.3g}" if isinstance(v, float) else f"  {k:<66}{v:>10}")


def _print_memory(r: dict) -> None:
    psi = r["params"]
    print(
        f"\n[3] memory per worker: run_train, {r['model']}, Ψ = {psi / 1e6:.1f} M trainable parameters, "
        f"{r['workers']} CPU workers (fp32), DPO + MLC (m=4, d={r.get('mlc_d')}), max_length {r['max_length']}"
    )
    print(
        f"{'ZeRO':<6}{'expected states/worker':>24}{'RSS before model':>18}{'memory_mb per step':>34}"
        f"{'peak in training':>18}{'peak at end':>14}{'step RSS - before':>19}"
    )
    for stage, x in sorted(r["stages"].items(), key=lambda kv: int(kv[0])):
        ws = x["workers"]
        exp = f"{EXPECTED_FORMULA[int(stage)]} = {x['expected_state_mb']:.0f}"
        before = " | ".join(f"{w['baseline_rss_mb']:.0f}" for w in ws)
        steps = " | ".join(",".join(f"{v:.0f}" for v in w["memory_mb"]) for w in ws)
        # the last step's report comes after the final checkpoint was written: peak before it = training only
        train_peak = " | ".join(
            f"{(w['peak_rss_mb_at_step'][-2] if len(w['peak_rss_mb_at_step']) > 1 else w['peak_rss_mb']):.0f}"
            for w in ws
        )
        peak = " | ".join(f"{w['peak_rss_mb']:.0f}" for w in ws)
        growth = " | ".join(f"{statistics.median(w['memory_mb']) - w['baseline_rss_mb']:.0f}" for w in ws)
        print(f"{stage:<6}{exp:>24}{before:>18}{steps:>34}{train_peak:>18}{peak:>14}{growth:>19}")
    print(
        "  (MiB, rank 0 | rank 1. memory_mb = RSS after each optimiser step as the worker reports it; peak in "
        "training = VmHWM\n   before the final checkpoint; step RSS - before = median memory_mb minus the RSS "
        "before the model was loaded.\n   RSS also holds activations, DeepSpeed's buffers and allocator slack.)"
    )


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.worker:
        report = run_steps(args) if args.worker == "steps" else run_memory(args)
        Path(args.json).write_text(json.dumps(report, indent=2, default=str))
        return 0
    import torch

    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, "
        f"load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}"
    )
    child = []  # the parts get their own --json
    skip = False
    for a in argv:
        if skip or a == "--json" or a.startswith("--json="):
            skip = a == "--json"
            continue
        child.append(a)
    report: dict[str, object] = {
        "args": {k: v for k, v in vars(args).items() if k != "worker"},
        "load_average_start": os.getloadavg(),
    }
    if not args.skip_steps:
        report["steps"] = _run_worker("steps", child)
        _print_steps(report["steps"], args)
    if not args.skip_memory:
        report["memory"] = _run_worker("memory", child)
        _print_memory(report["memory"])
    report["load_average_end"] = os.getloadavg()
    print(f"\nload average at the end: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(report, fh, indent=2, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
