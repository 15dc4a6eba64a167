"""The training flow's typed config: model, data, language mixture, loss, MLC term, optimiser, DeepSpeed, LoRA, checkpoints."""

from __future__ import annotations

from typing import Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

from raysafe.config import (
    ModelSpec,
    SourceSpec,
    Strict,
    TrackingSpec,
    capacity_field,
    on_off,
)


class MLCConfig(BaseModel):
    """Settings of the consistency term added to the alignment loss: ``L = L_align + weight · L_mlc``."""

    model_config = ConfigDict(extra="forbid")

    layer: int | float | Literal["final"] = Field(
        0.5,
        description="representation the consistency term reads, in the one layer convention (hidden_states[k]): "
        "an int k (0 = embeddings, k = output of decoder block k, the depth = the final state after the final "
        "norm), a depth fraction in (0, 1] (1.0 = the final state), or 'final' (the released MLC setting)",
    )
    pooling: Literal["last", "mean"] = "last"
    d: int = Field(512, ge=1, description="width of the projection head")
    tau: float = Field(0.2, gt=0)
    eps: float = Field(
        0.0,
        ge=0,
        description="added to τ·sg(σ₁) in the denominator only; 0 = the released code (Yuyan-B/MLC dpo/trainer.py "
        "_compute_aux_loss); ε > 0 lowers the loss by ≈ ε·Σ_j p_j σ_j/(τσ₁)² ≤ ε/τ² (docs/losses.md)",
    )
    form: Literal["released", "plain"] = "released"
    every_k: int = Field(2, ge=1)
    weight: float = Field(0.8, ge=0, description="λ")
    kind: Literal["mlc", "cosine"] = "mlc"
    head: Literal["linear", "linear_nobias", "frozen_random"] = Field(
        "linear",
        description="the extractor: linear = trainable Linear(hidden → d) with bias, as the released code "
        "(LLaMA-Factory's dpo/trainer.py adds torch.nn.Linear(hidden_size, extractor_dim) to the model); "
        "linear_nobias = the same without bias (a bias alone can make every language's vector equal); "
        "frozen_random = a fixed random orthogonal projection, no bias: only the backbone can lower the loss",
    )
    head_lr_scale: float = Field(
        1.0, ge=0, description="the head's learning rate as a multiple of optim.lr (1 = one lr for all, as released)"
    )

    def resolve_layer(self, num_layers: int) -> int:
        """The ``hidden_states`` index of ``layer`` for a model of ``num_layers`` decoder layers
        (:func:`raysafe.models.layers.resolve_layer`)."""
        from raysafe.models.layers import resolve_layer

        return resolve_layer(self.layer, num_layers, where="mlc.layer")

    def schedule(self) -> "MLCSchedule":  # noqa: F821  (imported when called: parsing a config loads no torch)
        """The step schedule of this configuration."""
        from raysafe.train.mlc import MLCSchedule

        return MLCSchedule(self.every_k)


class MixtureSpec(Strict):
    """Which languages form the m prompt variants of each pair, with what sampling weights."""

    languages: list[str] = ["en", "zh", "ru", "ja", "ar", "bn", "sw", "ur", "ps", "ku"]
    weights: list[float] | None = None
    m: int = Field(10, ge=2, description="variants per prompt (the anchor included)")
    anchor: str = "en"
    preset: Literal["none", "dominant_balanced"] = "none"
    dominant: str | None = Field(None, description="the dominant language of the dominant_balanced preset")
    dominant_share: float = Field(0.5, gt=0, lt=1)

    @model_validator(mode="after")
    def _consistent(self) -> "MixtureSpec":
        langs = self.languages
        dupes = sorted({x for x in langs if langs.count(x) > 1})
        if dupes:
            raise ValueError(f"mixture.languages repeats {dupes}: list each language once")
        if self.weights is not None and len(self.weights) != len(langs):
            raise ValueError(
                f"mixture.weights has {len(self.weights)} values for {len(langs)} mixture.languages: give one "
                "weight per language, or none"
            )
        if self.m > len(langs):
            raise ValueError(
                f"mixture.m={self.m} variants per prompt cannot be drawn from {len(langs)} mixture.languages "
                "(without replacement): lower mixture.m or add languages"
            )
        if self.preset == "none" and self.anchor not in langs:
            raise ValueError(
                f"mixture.anchor {self.anchor!r} is not in mixture.languages {langs}: add it there or choose "
                "another anchor"
            )
        if self.preset == "dominant_balanced" and (self.dominant or self.anchor) not in langs:
            raise ValueError(
                f"the dominant language {(self.dominant or self.anchor)!r} (mixture.dominant, else mixture.anchor) "
                f"is not in mixture.languages {langs}"
            )
        if self.preset == "dominant_balanced" and self.weights is not None:
            raise ValueError("mixture.weights and preset dominant_balanced both set the weights: remove one")
        return self


class LossSpec(Strict):
    """The alignment loss: ``name`` is an entry of ``raysafe.train.losses.ALIGNMENT_LOSSES``, which says which of the
    fields below it takes (docs/losses.md)."""

    name: str = Field("dpo", description="dpo | simpo | orpo | sft (the entries of the loss registry)")
    kind: Literal["sigmoid", "robust", "ipo", "hinge"] = "sigmoid"
    beta: float = Field(0.1, gt=0)
    label_smoothing: float = Field(0.0, ge=0, lt=0.5)
    gamma: float = Field(0.5, ge=0, description="SimPO margin")
    nll_normalisation: Literal["token", "sequence"] = Field(
        "token",
        description="ORPO's SFT term: token = one mean over all chosen tokens of the batch (TRL); "
        "sequence = mean over pairs of each chosen answer's per-token mean NLL (LLaMA-Factory)",
    )

    @field_validator("name")
    @classmethod
    def _known_loss(cls, v: str) -> str:
        from raysafe.train.losses import ALIGNMENT_LOSSES  # imported when validated: the registry holds torch code

        if v not in ALIGNMENT_LOSSES:
            raise ValueError(f"unknown alignment loss {v!r}; use one of {sorted(ALIGNMENT_LOSSES)}")
        return v

    def params(self) -> dict:
        """The hyper-parameters the registry entry of ``name`` declares, with their values here."""
        from raysafe.train.losses import loss_entry

        return {k: getattr(self, k) for k in loss_entry(self.name).params}


class OptimSpec(Strict):
    lr: float = Field(6e-7, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    epochs: int = Field(3, ge=1)
    max_steps: int | None = Field(None, ge=1, description="stop after this many optimiser steps")
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_ratio: float = Field(0.1, ge=0, lt=1)
    warmup_shape: Literal["hf", "shifted"] = Field(
        "hf",
        description="multiplier at step s < w: hf = s/w (transformers' schedules, used by the MLC release through "
        "LLaMA-Factory's Trainer; step 0 runs at lr 0), shifted = (s+1)/w",
    )
    micro_batch: int = Field(1, ge=1, description="pairs per worker per micro-step")
    grad_accum: int = Field(4, ge=1)
    clip: float = Field(1.0, gt=0)


class DeepSpeedSpec(Strict):
    zero_stage: Literal[0, 1, 2, 3] = 2
    offload_optimizer: bool = False
    offload_params: bool = False
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    reduce_bucket_size: int = Field(50_000_000, ge=1, description="elements per gradient reduce bucket (stages 2-3)")
    prefetch_bucket_size: int = Field(50_000_000, ge=1, description="elements prefetched ahead of use (stage 3)")


class LoraSpec(Strict):
    enabled: bool = False
    r: int = Field(16, ge=1)
    alpha: int = Field(32, ge=1)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] = ["q_proj", "k_proj", "v_proj", "o_proj"]


class TrainDataSpec(Strict):
    pairs: SourceSpec = SourceSpec(kind="fixture", name="preference_pairs")
    variants: SourceSpec = SourceSpec(kind="fixture", name="safety_prompts")
    split: str | None = Field("train", description="keep pairs of this split (None: all)")
    max_length: int = Field(1024, ge=8)
    max_prompt_length: int = Field(512, ge=4)
    prompt_truncation: Literal["head", "tail"] = Field(
        "head", description="keep a long prompt's start (the MLC release, LLaMA-Factory) or its end (and BOS)"
    )
    chat_template: Literal["auto", "on", "off"] = "auto"

    _switch = field_validator("chat_template", mode="before")(classmethod(lambda cls, v: on_off(v)))

    @model_validator(mode="after")
    def _lengths(self) -> "TrainDataSpec":
        if self.max_prompt_length >= self.max_length:
            raise ValueError(
                f"data.max_prompt_length={self.max_prompt_length} leaves no room for an answer within "
                f"data.max_length={self.max_length}: make max_prompt_length smaller than max_length"
            )
        return self


class CheckpointSpec(Strict):
    every_n_steps: int = Field(50, ge=1)
    keep: int = Field(2, ge=1)
    storage_path: str = Field("outputs/train", description="Ray Train storage (shared path or s3:// URI)")
    name: str | None = Field(
        None, description="run directory name under storage_path (default: derived from the model)"
    )
    resume_from: str | None = Field(None, description="a checkpoint directory to start from, or 'latest' in this run")
    max_failures: int = Field(1, ge=0, description="worker-group restarts from the latest checkpoint")
    stop_after_steps: int | None = Field(
        None,
        ge=1,
        description="end this call after this many optimiser steps, with a checkpoint (a time-limited allocation); "
        "the same command without it continues the run. Does not change the run's identity",
    )


class TrainRaySpec(Strict):
    address: str | None = None
    num_workers: int = Field(2, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0)
    torch_threads: int | None = Field(None, ge=1)
    capacity: dict[str, float] | None = capacity_field()


class TrainConfig(Strict):
    """`raysafe train`: MLC-augmented preference optimisation with Ray Train + DeepSpeed ZeRO."""

    model: ModelSpec
    reference: ModelSpec | None = Field(None, description="reference model (default: the policy's initial weights)")
    precompute_reference: Literal["auto", "on", "off"] = "auto"
    data: TrainDataSpec = TrainDataSpec()
    mixture: MixtureSpec = MixtureSpec()
    loss: LossSpec = LossSpec()
    mlc: MLCConfig = MLCConfig()
    optim: OptimSpec = OptimSpec()
    deepspeed: DeepSpeedSpec = DeepSpeedSpec()
    lora: LoraSpec = LoraSpec()
    gradient_checkpointing: bool = False
    checkpoint: CheckpointSpec = CheckpointSpec()
    ray: TrainRaySpec = TrainRaySpec()
    tracking: TrackingSpec = TrackingSpec()
    seed: int = 0

    _switch = field_validator("precompute_reference", mode="before")(classmethod(lambda cls, v: on_off(v)))
