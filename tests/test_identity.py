"""Identity of results: content fingerprints of model weights (with the digest cache), local paths made absolute at
config load, and activations + the analyses on them recomputed when the weights behind a path change."""

from __future__ import annotations

import json
import os

import pytest
import yaml

from raysafe.config import ModelSpec, SourceSpec, load_config
from raysafe.errors import ConfigError
from raysafe.models import loading


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    """A private raysafe cache, and a counter of the files the digest cache had to read."""
    monkeypatch.setenv("RAYSAFE_CACHE", str(tmp_path / "cache"))
    reads: list[str] = []
    real = loading._stream_digest

    def counting(path):
        reads.append(os.path.basename(path))
        return real(path)

    monkeypatch.setattr(loading, "_stream_digest", counting)
    return reads


# ------------------------------------------------------------------------------------------ weights fingerprint
def test_digest_cache_rereads_a_file_only_when_its_size_or_mtime_changes(tmp_path, cache):
    big = tmp_path / "weights.bin"
    big.write_bytes(os.urandom(1 << 20))
    first = loading.file_digest(big)
    assert cache == ["weights.bin"]
    assert loading.file_digest(big) == first and cache == ["weights.bin"]  # cached: not read again
    st = big.stat()
    os.utime(big, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # same bytes, newer mtime → read again
    assert loading.file_digest(big) == first and len(cache) == 2
    with big.open("ab") as f:  # other size → read again, other digest
        f.write(b"x")
    assert loading.file_digest(big) != first and len(cache) == 3
    assert loading.file_digest(big) and len(cache) == 3


def test_whole_file_is_hashed_not_its_first_bytes(tmp_path, cache):
    """Two files of one size that differ only after 16 MiB (where the old fingerprint stopped reading)."""
    head = b"\0" * ((1 << 24) + 10)
    a, b = tmp_path / "a.gguf", tmp_path / "b.gguf"
    a.write_bytes(head + b"A")
    b.write_bytes(head + b"B")
    assert loading.file_digest(a) != loading.file_digest(b)


def test_local_directory_fingerprint_follows_the_weights_not_config_json(tmp_path, cache):
    from raysafe.models.tiny import save_tiny, tiny_model

    d = save_tiny(tmp_path / "m", "llama", num_layers=2, hidden=32, seed=0)
    spec = ModelSpec(path=str(d))
    before = loading.resolve(spec).fingerprint
    assert loading.resolve(spec).fingerprint == before
    n_files = len(cache)
    config = (d / "config.json").read_bytes()
    tiny_model("llama", num_layers=2, hidden=32, seed=1).save_pretrained(d)  # other weights, same config.json
    assert (d / "config.json").read_bytes() == config
    after = loading.resolve(spec).fingerprint
    assert after != before
    # only the rewritten files were read again (the tokenizer files were not touched)
    assert set(cache[n_files:]) <= {"model.safetensors", "config.json", "generation_config.json"}


def test_resolving_a_local_model_does_not_hash_it(tmp_path, cache):
    """Workers resolve a model to load it: the fingerprint is computed only when asked for."""
    from raysafe.models.tiny import save_tiny

    d = save_tiny(tmp_path / "m", "llama", num_layers=1, hidden=16)
    r = loading.resolve(ModelSpec(path=str(d)))
    assert cache == [] and r.source == "local"
    assert r.fingerprint and cache


def test_hub_fingerprint_pins_the_cached_commit(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    assert loading.hub_fingerprint("org/model", None) == "org/model@main"
    sha = "0123456789abcdef0123456789abcdef01234567"
    assert loading.hub_fingerprint("org/model", sha) == f"org/model@{sha}"
    refs = tmp_path / "models--org--model" / "refs"
    refs.mkdir(parents=True)
    (refs / "main").write_text(sha)
    assert loading.hub_fingerprint("org/model", None) == f"org/model@{sha}"
    assert loading.resolve(ModelSpec(path="org/model")).fingerprint == f"org/model@{sha}"


def test_analysis_identity_chains_config_and_inputs_but_not_tracking():
    from raysafe.identity import analysis_identity

    cfg = {"layers": [1], "tracking": {"run_name": "a"}, "ray": {"num_actors": 1}}
    base = analysis_identity(cfg, {"m": {"weights": "w1"}})
    assert (
        analysis_identity(cfg | {"tracking": {"run_name": "b"}, "ray": {"num_actors": 4}}, {"m": {"weights": "w1"}})
        == base
    )
    assert analysis_identity(cfg, {"m": {"weights": "w2"}}) != base
    assert analysis_identity(cfg | {"layers": [2]}, {"m": {"weights": "w1"}}) != base


# ------------------------------------------------------------------------------------------------ local paths
def test_relative_model_path_in_a_train_config_is_absolute_and_found_from_another_cwd(
    tmp_path, monkeypatch, tiny_llama_dir
):
    import shutil

    from raysafe.models.loading import load_causal_lm, resolve
    from raysafe.train.config import TrainConfig

    work = tmp_path / "project"
    (work / "outputs").mkdir(parents=True)
    shutil.copytree(tiny_llama_dir, work / "outputs" / "tiny-llama")
    (work / "train.yaml").write_text(yaml.safe_dump({"model": {"path": "outputs/tiny-llama", "name": "tiny"}}))
    monkeypatch.chdir(work)
    cfg = load_config(TrainConfig, "train.yaml")
    assert cfg.model.path == str(work / "outputs" / "tiny-llama") and cfg.model.label == "tiny"
    # A Ray Train worker gets the config as data and runs elsewhere: the path still names the directory.
    worker_dir = tmp_path / "worker"
    worker_dir.mkdir()
    monkeypatch.chdir(worker_dir)
    spec = TrainConfig.model_validate(cfg.model_dump(mode="json")).model
    resolved = resolve(spec)
    assert resolved.source == "local" and resolved.path == str(work / "outputs" / "tiny-llama")
    assert load_causal_lm(spec, "cpu", resolved).config.num_hidden_layers == 4


@pytest.mark.parametrize("path", ["./no-such-model", "../no-such-model", "~/no-such-raysafe-model", "m.gguf"])
def test_local_model_path_that_does_not_exist_is_a_config_error_naming_the_field(tmp_path, monkeypatch, path):
    from raysafe.train.config import TrainConfig

    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as e:
        load_config(TrainConfig, data={"model": {"path": path}})
    assert f"model.path = {path!r}" in e.value.what and "does not exist" in e.value.what


def test_hub_ids_and_demo_alias_stay_as_they_are(tmp_path, monkeypatch):
    from raysafe.extract.config import ExtractConfig

    monkeypatch.chdir(tmp_path)
    cfg = load_config(
        ExtractConfig,
        data={
            "models": [{"path": "Qwen/Qwen2.5-7B"}, {"path": "gemma3-270m"}],
            "data": {"kind": "hub", "path": "textdetox/multilingual_toxicity_dataset"},
            "output_dir": "outs/acts",
        },
    )
    assert [m.path for m in cfg.models] == ["Qwen/Qwen2.5-7B", "gemma3-270m"]
    assert cfg.data.path == "textdetox/multilingual_toxicity_dataset"
    assert cfg.output_dir == str(tmp_path / "outs" / "acts")  # where the extraction actors write


def test_relative_data_file_is_absolute_or_a_config_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "rows.jsonl").write_text("{}\n")
    assert SourceSpec(kind="file", path="rows.jsonl").path == str(tmp_path / "rows.jsonl")
    from raysafe.extract.config import ExtractConfig

    with pytest.raises(ConfigError, match=r"data\.path = 'missing\.jsonl': .*does not exist"):
        load_config(
            ExtractConfig, data={"models": [{"path": "org/m"}], "data": {"kind": "file", "path": "missing.jsonl"}}
        )


# ---------------------------------------------------------------------------- activations and analyses on them
@pytest.mark.slow
def test_new_weights_at_the_same_path_recompute_every_shard_and_the_analysis(tmp_path, ray_local, monkeypatch):
    """Swap the weights of a local model directory, keeping config.json: the extraction redoes every shard, and the
    separation analysis on them is computed from the new activations, whose identity it records."""
    import polars as pl

    from raysafe.extract.store import ActivationStore
    from raysafe.models.tiny import save_tiny, tiny_model
    from raysafe.separation.config import SeparationConfig
    from raysafe.separation.flow import run_separation

    monkeypatch.setenv("RAYSAFE_CACHE", str(tmp_path / "cache"))
    model = save_tiny(tmp_path / "model", "llama", num_layers=2, hidden=32, seed=0)
    cfg = load_config(
        SeparationConfig,
        data={
            "base": {"name": "base", "path": str(model)},
            "safety": {"kind": "fixture", "name": "safety_prompts", "languages": ["en", "ru"]},
            "detox": None,
            "activations_dir": str(tmp_path / "acts"),
            "output_dir": str(tmp_path / "out"),
            "options": {"k": 2, "bootstrap": 0, "probe_folds": 2, "metrics": ["bhattacharyya", "between_var_ratio"]},
            "scatter_points_per_class": 10,
            "torch_threads": 1,
            "extract": {"shard_rows": 16, "max_length": 32},
            "ray": {"num_actors": 1, "torch_threads": 1},
            "tracking": {"enabled": False},
        },
    )
    store = ActivationStore(tmp_path / "acts" / "safety")

    def markers():
        return {p.name: json.loads(p.read_text()) for p in sorted((store.model_dir("base") / "_done").glob("*.json"))}

    first = run_separation(cfg, progress=False)
    n_shards = store.inputs()["shards"]
    assert first.extracted["safety"] and n_shards >= 2 and len(markers()) == n_shards
    old_markers, (_, old_x) = markers(), store.read_layer("base", 2)
    old_record = json.loads((tmp_path / "out" / "activations.json").read_text())
    old_ident = old_record["activations"]["safety"]["models"]["base"]
    assert old_record["identity"] == first.identity
    assert first.activations["safety"]["models"]["base"] == old_ident

    again = run_separation(cfg, progress=False)  # nothing changed: reused, same identity
    assert not again.extracted["safety"] and markers() == old_markers and again.identity == first.identity

    config = (model / "config.json").read_bytes()
    tiny_model("llama", num_layers=2, hidden=32, seed=1).save_pretrained(model)  # same config.json, new weights
    assert (model / "config.json").read_bytes() == config
    third = run_separation(cfg, progress=False)
    assert third.extracted["safety"]
    new_markers = markers()
    assert len(new_markers) == n_shards
    assert all(m["identity"] != old_markers[k]["identity"] for k, m in new_markers.items())  # every shard redone
    _, new_x = store.read_layer("base", 2)
    assert new_x.shape == old_x.shape and not (new_x == old_x).all()
    new_record = json.loads((tmp_path / "out" / "activations.json").read_text())
    new_ident = new_record["activations"]["safety"]["models"]["base"]
    assert new_record["identity"] == third.identity != first.identity
    assert new_ident["weights"] != old_ident["weights"] and new_ident["activations"] != old_ident["activations"]
    assert new_ident["texts"] == old_ident["texts"]
    key = ["model", "lang", "layer", "metric"]
    a = first.table.filter(pl.col("metric") == "bhattacharyya").select(*key, "value").sort(key)
    b = third.table.filter(pl.col("metric") == "bhattacharyya").select(*key, "value").sort(key)
    assert a.height == b.height and a["value"].to_list() != b["value"].to_list()
    assert f"`base` {new_ident['weights']}" in (tmp_path / "out" / "separation_report.md").read_text()
