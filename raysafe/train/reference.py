"""Reference log-probs precomputed in one Ray Data pass, so the reference model need not sit beside the policy
during training (the memory peak of DPO on large models)."""

from __future__ import annotations

import numpy as np
import torch

from raysafe.train.config import TrainConfig
from raysafe.train.data import to_collator_samples


class ReferenceStage:
    """Ray Data stage: preference rows → the same rows with ``ref_chosen`` / ``ref_rejected`` (summed log-probs)."""

    def __init__(self, cfg: dict, torch_threads: int | None = None):
        from raysafe.models.loading import load_model
        from raysafe.train.worker import make_collator

        if torch_threads:
            torch.set_num_threads(torch_threads)
        self.cfg = TrainConfig.model_validate(cfg)
        self.model, tok = load_model(self.cfg.reference or self.cfg.model)
        self.model.requires_grad_(False)
        self.collator = make_collator(self.cfg, tok)
        self.device = next(self.model.parameters()).device

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from raysafe.train.forward import policy_forward

        enc = self.collator(to_collator_samples(batch))
        enc = {k: (v.to(self.device) if isinstance(v, torch.Tensor) else v) for k, v in enc.items()}
        with torch.inference_mode():
            out = policy_forward(self.model, enc, None)
        return {
            "sample_idx": batch["sample_idx"],
            "ref_chosen": out.chosen_logps.float().cpu().numpy(),
            "ref_rejected": out.rejected_logps.float().cpu().numpy(),
        }
