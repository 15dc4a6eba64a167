"""The Ray Train worker loop: DeepSpeed ZeRO over L_align + λ·L_mlc, checkpoints that restore, MLflow from rank 0.

Data order is deterministic: every worker reads the same globally ordered stream (epochs of seeded permutations),
takes its slice of each global micro-batch, and after a restart skips the micro-batches the checkpoint already
covers, so no batch is lost or repeated. The checkpoint's ``trainer_state.json`` carries the per-step record
(step, epoch, the group ids each step consumed, losses) of the run that led to it and the data position; each
worker's random-number state is saved with it and restored just before training continues, so a killed and resumed
run is bit-identical (on CPU) to an uninterrupted one. A checkpoint is verified against its manifest of digests
before DeepSpeed loads it.

Under ZeRO-3 the policy (and the on-worker reference model) are partitioned as they are built
(:func:`zero3_construction`: transformers' ``HfDeepSpeedConfig`` makes ``from_pretrained`` run under
``deepspeed.zero.Init`` and load each layer's weights into its partitions), so no worker ever holds the whole model;
the reference model becomes a ZeRO-3 inference engine whose forward gathers the parameters layer by layer.
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path

import psutil
import torch
from torch import nn

from raysafe import tracking
from raysafe.consistency import mlc_diagnostics
from raysafe.train.checkpoint import DS_DIR, STATE_FILE, probe_logps, write_checkpoint
from raysafe.train.collate import PreferenceCollator
from raysafe.train.config import MLCConfig, TrainConfig
from raysafe.train.data import to_collator_samples
from raysafe.train.ds_config import deepspeed_config, lr_lambda
from raysafe.train.forward import policy_forward
from raysafe.train.identity import IDENTITY_FILE, check_same_run, read_identity
from raysafe.train.losses import alignment_loss
from raysafe.train.manifest import verify_manifest
from raysafe.train.mlc import MLCHead, consistency_loss, head_monitor
from raysafe.train.rng import apply_rng, read_rng, rng_file


class AlignModule(nn.Module):
    """Policy + MLC head; ``forward`` returns the total loss and detached diagnostics of one micro-batch."""

    def __init__(self, policy: nn.Module, head: MLCHead | None, cfg: TrainConfig, mlc_layer: int | None):
        super().__init__()
        self.policy = policy
        self.head = head
        self.loss_name = cfg.loss.name
        self.loss_params = cfg.loss.params()
        self.mlc: MLCConfig = cfg.mlc
        self.mlc_layer = mlc_layer
        self.grad_norms: list[float] = []  # norm of the MLC gradient reaching the model, per MLC micro-batch

    def forward(
        self, batch: dict, ref_chosen: torch.Tensor | None, ref_rejected: torch.Tensor | None, mlc_active: bool
    ) -> tuple[torch.Tensor, dict]:
        layer = self.mlc_layer if (mlc_active and self.head is not None) else None
        out = policy_forward(self.policy, batch, layer, pooling=self.mlc.pooling, head_chunk=512)
        align = alignment_loss(
            self.loss_name,
            chosen_logps=out.chosen_logps,
            rejected_logps=out.rejected_logps,
            chosen_ntok=out.chosen_ntok,
            rejected_ntok=out.rejected_ntok,
            ref_chosen_logps=ref_chosen,
            ref_rejected_logps=ref_rejected,
            **self.loss_params,
        )
        metrics = {f"align/{k}": v for k, v in align.metrics.items()}
        metrics["loss/align"] = align.loss.detach()
        loss = align.loss
        if layer is not None:
            hidden = out.variant_hidden
            if hidden.requires_grad:  # the head is its only consumer: what arrives here is λ·∂L_mlc/∂h
                hidden.register_hook(lambda g: self.grad_norms.append(float(g.float().norm(dim=-1).mean())))
            z = self.head(hidden.float())
            cons = consistency_loss(z, self.mlc)
            loss = loss + self.mlc.weight * cons.loss
            metrics["loss/mlc"] = cons.loss.detach()
            diag = mlc_diagnostics(z.detach(), out.variant_hidden.detach().float())
            metrics["mlc/rank1_energy"] = diag["rank1_energy"]
            metrics["mlc/cosine_z"] = diag["cosine_z"]
            metrics["mlc/cosine_hidden"] = diag["cosine_hidden"]
            metrics["mlc/sigma1"] = diag["spectrum"][0]
            metrics.update(head_monitor(self.head, out.variant_hidden.detach()))
        metrics["loss/total"] = loss.detach()
        return loss, metrics


def param_groups(module: AlignModule, cfg: TrainConfig) -> list[dict]:
    """The optimiser's parameter groups: the policy at ``optim.lr``, the MLC head (if it has trainable parameters)
    at ``optim.lr × mlc.head_lr_scale``."""
    policy = [p for p in module.policy.parameters() if p.requires_grad]
    groups = [{"params": policy, "lr": cfg.optim.lr}]
    head = [p for p in module.head.parameters() if p.requires_grad] if module.head is not None else []
    if head:
        groups.append({"params": head, "lr": cfg.optim.lr * cfg.mlc.head_lr_scale})
    return groups


def _scalar(v) -> float:
    if isinstance(v, torch.Tensor):
        return float(v.float().mean())
    return float(v)


def _memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return psutil.Process().memory_info().rss / 2**20


@contextlib.contextmanager
def zero3_construction(ds_cfg: dict):
    """Inside: under ZeRO-3, ``from_pretrained`` builds the model under ``deepspeed.zero.Init`` (each rank allocates
    only its partition of every parameter) and copies the checkpoint into the partitions layer by layer (transformers
    reads ``is_deepspeed_zero3_enabled()`` from the live ``HfDeepSpeedConfig``). Outside, transformers builds plain
    models again (the CPU export of the final checkpoint needs that). Below ZeRO-3: nothing changes."""
    if ds_cfg["zero_optimization"]["stage"] != 3:
        yield
        return
    from transformers.integrations import HfDeepSpeedConfig, unset_hf_deepspeed_config

    live = HfDeepSpeedConfig(ds_cfg)  # transformers keeps only a weak reference: it must stay alive while loading
    try:
        yield
    finally:
        del live
        unset_hf_deepspeed_config()


def lora_config(cfg: TrainConfig):
    """The peft ``LoraConfig`` of ``cfg.lora`` (training and the CPU export rebuild the same adapter)."""
    from peft import LoraConfig

    return LoraConfig(
        r=cfg.lora.r,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        target_modules=cfg.lora.target_modules,
        task_type="CAUSAL_LM",
    )


def build_policy(cfg: TrainConfig, device: torch.device):
    """(policy in train mode, tokenizer); call it inside :func:`zero3_construction` to partition it at load."""
    from raysafe.models.loading import load_model

    model, tok = load_model(cfg.model, device)
    model.train()
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if cfg.lora.enabled:
        from peft import get_peft_model

        model = get_peft_model(model, lora_config(cfg))
    return model, tok


def reference_ds_config(ds_cfg: dict) -> dict:
    """DeepSpeed config of the frozen reference model: ZeRO-3 without an optimiser (parameters stay partitioned and
    are gathered layer by layer in the forward); below ZeRO-3 the reference is a plain module and needs none."""
    zero = {k: v for k, v in ds_cfg["zero_optimization"].items() if k != "offload_optimizer"}
    return {**ds_cfg, "zero_optimization": zero}


def build_reference(cfg: TrainConfig, device: torch.device, ds_cfg: dict):
    """The on-worker reference model (frozen, eval mode) and, under ZeRO-3, the inference engine that keeps its
    partitions gathered for each forward (the engine must stay alive as long as the model is used). Call it inside
    :func:`zero3_construction`."""
    from raysafe.models.loading import load_causal_lm

    reference = load_causal_lm(cfg.reference or cfg.model, device)
    reference.eval().requires_grad_(False)
    if ds_cfg["zero_optimization"]["stage"] != 3:
        return reference, None
    import deepspeed

    engine, *_ = deepspeed.initialize(model=reference, config=reference_ds_config(ds_cfg), dist_init_required=False)
    engine.eval()
    return engine.module, engine


def load_models(cfg: TrainConfig, device: torch.device, ds_cfg: dict, reference_on_worker: bool):
    """(policy, tokenizer, reference or None, reference engine or None), partitioned at construction under ZeRO-3."""
    with zero3_construction(ds_cfg):
        policy, tok = build_policy(cfg, device)
        reference, ref_engine = build_reference(cfg, device, ds_cfg) if reference_on_worker else (None, None)
    return policy, tok, reference, ref_engine


def make_collator(cfg: TrainConfig, tok) -> PreferenceCollator:
    template = {"auto": "auto", "on": True, "off": False}[cfg.data.chat_template]
    return PreferenceCollator(
        tok,
        max_length=cfg.data.max_length,
        max_prompt_length=cfg.data.max_prompt_length,
        use_chat_template=template,
        prompt_truncation=cfg.data.prompt_truncation,
    )


def train_loop(config: dict) -> None:
    """The function every Ray Train worker runs (``TorchTrainer(train_loop_per_worker=train_loop, ...)``)."""
    import deepspeed
    import ray.train

    cfg = TrainConfig.model_validate(config["cfg"])
    total_steps: int = config["total_steps"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if cfg.ray.torch_threads:
        torch.set_num_threads(cfg.ray.torch_threads)
    on_gpu = cfg.ray.use_gpu and torch.cuda.is_available()
    device = torch.device("cuda", ray.train.torch.get_device().index or 0) if on_gpu else torch.device("cpu")
    torch.manual_seed(cfg.seed)

    ds_cfg = deepspeed_config(cfg.deepspeed, cfg.optim, on_gpu)
    policy, tok, reference, _ref_engine = load_models(cfg, device, ds_cfg, config["reference_on_worker"])
    from raysafe.models.layers import num_layers

    n_layers = num_layers(policy.get_base_model() if hasattr(policy, "get_base_model") else policy)
    mlc_layer = cfg.mlc.resolve_layer(n_layers) if cfg.mlc.weight > 0 else None
    head = MLCHead(policy.config.hidden_size, cfg.mlc.d, cfg.mlc.head, cfg.seed) if mlc_layer is not None else None
    module = AlignModule(policy, head.to(device) if head is not None else None, cfg, mlc_layer)
    optimizer = torch.optim.AdamW(param_groups(module, cfg), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(cfg.optim.schedule, total_steps, cfg.optim.warmup_ratio, cfg.optim.warmup_shape)
    )
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=module, optimizer=optimizer, lr_scheduler=scheduler, config=ds_cfg, dist_init_required=False
    )

    step, record, rng_state, resumed_micro = 0, [], None, None
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            state = json.loads((Path(d) / STATE_FILE).read_text())
            verify_manifest(Path(d), state.get("world_size"))  # before DeepSpeed unpickles anything in it
            own = (
                cfg.checkpoint.resume_from is None
                or Path(ckpt.path).resolve() != Path(cfg.checkpoint.resume_from).resolve()
            )
            if own:  # the run's own checkpoint (not resume_from's): a backstop for storage URIs
                check_same_run(Path(d).parent, read_identity(Path(d) / IDENTITY_FILE), config["identity"])
            engine.load_checkpoint(str(Path(d) / DS_DIR), tag="ds")
            if rng_file(Path(d), rank).is_file():
                rng_state = read_rng(rng_file(Path(d), rank))
        step, record, resumed_micro = state["step"], state["record"], state.get("micro_batches")

    collator = make_collator(cfg, tok)
    schedule = cfg.mlc.schedule()

    mb, ga = cfg.optim.micro_batch, cfg.optim.grad_accum
    group = mb * world  # rows per global micro-batch
    skip = resumed_micro if resumed_micro is not None else step * ga  # global micro-batches the checkpoint covers
    stop_after = cfg.checkpoint.stop_after_steps
    if rng_state is not None:  # last, once everything that may draw random numbers while loading has run
        apply_rng(rng_state)
    shard = ray.train.get_dataset_shard("train")
    run_log = tracking.attach(config.get("mlflow") if rank == 0 else None, node="rank0")  # others: a no-op

    acc: dict[str, list[float]] = {}
    last_mlc: dict[str, float] = {}  # the MLC metrics of the last step that had the term (MLC runs every k-th step)
    step_groups: list[str] = []
    step_tokens = 0
    t_step = time.perf_counter()
    micro = 0
    probe = None  # the run's first micro-batch: its log-probs are stored with every checkpoint (checks any export)
    for gbatch in shard.iter_batches(batch_size=group, batch_format="numpy", drop_last=True):
        if probe is None:
            probe = collator(to_collator_samples({k: v[:mb] for k, v in gbatch.items()}))
        if micro < skip:
            micro += 1
            continue
        if step >= total_steps or (stop_after is not None and step >= stop_after):
            break
        lo = rank * mb
        mine = {k: v[lo : lo + mb] for k, v in gbatch.items()}
        batch = collator(to_collator_samples(mine))
        batch = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
        ref_c = ref_r = None
        if "ref_chosen" in mine:
            ref_c = torch.as_tensor(mine["ref_chosen"], dtype=torch.float32, device=device)
            ref_r = torch.as_tensor(mine["ref_rejected"], dtype=torch.float32, device=device)
        elif reference is not None:
            with torch.no_grad():
                ro = policy_forward(reference, batch, None)
            ref_c, ref_r = ro.chosen_logps.float(), ro.rejected_logps.float()
        loss, metrics = engine(batch, ref_c, ref_r, schedule.active(step))
        engine.backward(loss)
        engine.step()
        micro += 1
        for k, v in metrics.items():
            acc.setdefault(k, []).append(_scalar(v))
        if module.grad_norms:
            acc.setdefault("head/grad_norm_hidden", []).extend(module.grad_norms)
            module.grad_norms.clear()
        step_groups.extend(str(g) for g in gbatch["group_id"])
        step_tokens += int(batch["attention_mask"].sum()) * world
        if micro % ga:
            continue
        # ---- an optimiser step finished
        dt = time.perf_counter() - t_step
        out = {k: sum(v) / len(v) for k, v in acc.items()}
        out.update(
            step=step + 1,
            epoch=int(gbatch["epoch"][-1]),
            lr=scheduler.get_last_lr()[0],
            step_time_s=dt,
            tokens_per_s=step_tokens / dt,
            memory_mb=_memory_mb(device),
            mlc_active=float(schedule.active(step)),
        )
        record.append(
            {
                "step": step + 1,
                "epoch": out["epoch"],
                "groups": step_groups,
                "loss": out["loss/total"],
                "loss_align": out["loss/align"],
                "mlc_active": bool(out["mlc_active"]),
            }
        )
        step += 1
        run_log.log_metrics({k: v for k, v in out.items() if k != "step"}, step=step)
        if out["mlc_active"]:
            last_mlc = {k: v for k, v in out.items() if k.startswith(("mlc/", "head/", "loss/mlc"))}
            last_mlc["mlc_metrics_step"] = step
        last = step >= total_steps or step == stop_after
        if step % cfg.checkpoint.every_n_steps == 0 or last:
            expected = probe_logps(module.policy, probe, device)
            state = {**last_mlc, **out}  # a checkpoint after a step without MLC still shows the last MLC metrics
            write_checkpoint(
                engine,
                tok,
                cfg,
                step,
                record,
                state,
                rank,
                probe,
                expected,
                config["identity"],
                world,
                micro,
                export=last,  # the Hugging Face export: at the end of the call only (`raysafe export` for others)
            )
        else:
            ray.train.report({k: float(v) for k, v in out.items()})
        acc, step_groups, step_tokens, t_step = {}, [], 0, time.perf_counter()
    run_log.close()
