"""ZeRO-3 partitions the policy as it is built (issue 22 item 1): ``raysafe.train.worker.load_models`` under
``deepspeed.zero_stage=3`` constructs it under ``deepspeed.zero.Init`` (every parameter a ZeRO parameter holding a
partition), ZeRO-2 loads plain tensors, and after loading transformers builds plain models again (the export needs
that); and the export's reader of DeepSpeed files gives back the live weights for ZeRO-0/2/3. One process, world
size 1 (a gloo group of its own, in a subprocess so no distributed state leaks)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

SCRIPT = r"""
import json, os, sys
import torch, torch.distributed as dist
import deepspeed
from transformers.integrations import is_deepspeed_zero3_enabled
from raysafe.train.config import TrainConfig
from raysafe.train.ds_config import deepspeed_config
from raysafe.train.worker import load_models

dist.init_process_group("gloo", rank=0, world_size=1)
deepspeed.init_distributed(dist_backend="gloo")
out = {}
for stage in (2, 3):
    cfg = TrainConfig.model_validate({"model": {"path": sys.argv[1]}, "deepspeed": {"zero_stage": stage},
                                      "lora": {"enabled": stage == 3, "r": 2}})
    ds = deepspeed_config(cfg.deepspeed, cfg.optim, on_gpu=False)
    policy, tok, ref, engine = load_models(cfg, torch.device("cpu"), ds, reference_on_worker=True)
    base = [(n, p) for n, p in policy.named_parameters() if "lora_" not in n]
    out[stage] = {
        "zero_params": sum(hasattr(p, "ds_id") for _, p in base),
        "params": len(base),
        "empty_data": sum(p.data.numel() == 0 for _, p in base),
        "lora_trainable": sum(p.requires_grad for n, p in policy.named_parameters() if "lora_" in n),
        "ref_zero": sum(hasattr(p, "ds_id") for p in ref.parameters()),
        "ref_engine": engine is not None,
        "zero3_after": is_deepspeed_zero3_enabled(),
    }
print("RESULT" + json.dumps(out))
"""


def test_zero3_builds_the_policy_and_reference_partitioned_zero2_plain(tiny_llama_dir, tmp_path):
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29731", "PYTHONPATH": os.getcwd()}
    env.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")  # what Ray Train sets
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tiny_llama_dir)], capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (line,) = [x for x in proc.stdout.splitlines() if x.startswith("RESULT")]
    got = {int(k): v for k, v in json.loads(line.removeprefix("RESULT")).items()}
    n = got[3]["params"]
    # ZeRO-3: every base parameter is a ZeRO parameter whose full tensor is released (data empty between uses)
    assert got[3]["zero_params"] == n and got[3]["empty_data"] == n
    assert got[3]["lora_trainable"] > 0  # peft wrapped the partitioned model
    assert got[3]["ref_zero"] > 0 and got[3]["ref_engine"]  # the reference: partitioned, inside an inference engine
    # ZeRO-2: plain tensors, no engine for the reference
    assert got[2]["zero_params"] == 0 and got[2]["empty_data"] == 0 and not got[2]["ref_engine"]
    assert not got[2]["zero3_after"] and not got[3]["zero3_after"]


SHARDS = r"""
import json, sys, tempfile
from pathlib import Path
import torch, torch.distributed as dist
import deepspeed
from raysafe.train.config import TrainConfig
from raysafe.train.ds_config import deepspeed_config
from raysafe.train.export import checkpoint_state_dict, export_state_dict
from raysafe.train.mlc import MLCHead
from raysafe.train.worker import AlignModule, load_models, param_groups

dist.init_process_group("gloo", rank=0, world_size=1)
deepspeed.init_distributed(dist_backend="gloo")
out = {}
for stage in (0, 2, 3):
    cfg = TrainConfig.model_validate({"model": {"path": sys.argv[1]}, "deepspeed": {"zero_stage": stage},
                                      "lora": {"enabled": stage == 2, "r": 2}, "mlc": {"d": 160}})
    ds = deepspeed_config(cfg.deepspeed, cfg.optim, on_gpu=False)
    policy, tok, _, _ = load_models(cfg, torch.device("cpu"), ds, reference_on_worker=False)
    # hidden·d + d = 10,400 > stage3_param_persistence_threshold (1e4): ZeRO-3 partitions the head too
    module = AlignModule(policy, MLCHead(policy.config.hidden_size, 160), cfg, 1)
    opt = torch.optim.AdamW(param_groups(module, cfg), lr=1e-3)
    engine, *_ = deepspeed.initialize(model=module, optimizer=opt, config=ds, dist_init_required=False)
    live = engine._zero3_consolidated_16bit_state_dict() if stage == 3 else engine.module.state_dict()
    d = Path(tempfile.mkdtemp())
    engine.save_checkpoint(str(d / "deepspeed"), tag="ds")
    read = checkpoint_state_dict(d, stage)
    export_state_dict(live, cfg, tok, d / "export")
    head = MLCHead.load(d / "export" / "model")
    out[stage] = {"keys_equal": sorted(read) == sorted(live), "n": len(live),
                  "max_diff": max(float((read[k].float() - live[k].float()).abs().max()) for k in live),
                  "head_partitioned": hasattr(module.head.proj.weight, "ds_id"),
                  "head_equal": torch.equal(head.proj.weight, live["head.proj.weight"].cpu())}
print("RESULT" + json.dumps(out))
"""


def test_export_reads_every_stages_deepspeed_files_back_to_the_live_weights(tiny_llama_dir):
    """``raysafe export``'s reader: ZeRO-0 module states, ZeRO-2 (with LoRA's frozen base) and ZeRO-3 fp32 shards
    give the engine's own weights, key for key; the export writes the MLC head's gathered weights, also when ZeRO-3
    partitioned it."""
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29732", "PYTHONPATH": os.getcwd()}
    env.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
    proc = subprocess.run(
        [sys.executable, "-c", SHARDS, str(tiny_llama_dir)], capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (line,) = [x for x in proc.stdout.splitlines() if x.startswith("RESULT")]
    got = json.loads(line.removeprefix("RESULT"))
    for stage, r in got.items():
        assert r["keys_equal"] and r["n"] > 30 and r["max_diff"] == 0.0, (stage, r)
        assert r["head_equal"] and r["head_partitioned"] == (stage == "3"), (stage, r)  # exported from any stage
