"""Bad input gets a clear error naming the file, row, field, language or layer — before any work starts."""

from __future__ import annotations

import json

import pytest

from raysafe.cli import main
from raysafe.config import load_config
from raysafe.errors import ConfigError, DataError, ModelError, OutputError
from raysafe.extract.config import ExtractConfig
from raysafe.extract.flow import load_text_rows, run_extract
from raysafe.extract.stages import tokenize_texts


def write_rows(path, rows):
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows), encoding="utf-8")
    return path


def cfg_for(path, model="no-such-org/no-such-model", **kw):
    return load_config(
        ExtractConfig,
        data={
            "models": [{"path": str(model)}],
            "data": {"kind": "file", "path": str(path)},
            "tracking": {"enabled": False},
            **kw,
        },
    )


GOOD = {"group_id": "g1", "lang": "en", "text": "hello"}


@pytest.mark.parametrize(
    "bad,message,where",
    [
        ({"group_id": "g2", "lang": "en", "text": "   "}, "empty or missing 'text'", "group_id='g2'"),
        ({"group_id": "g3", "lang": "en", "text": None}, "empty or missing 'text'", "group_id='g3'"),
        ({"group_id": "g4", "lang": "xx", "text": "hi"}, "unknown language code(s) ['xx']", "group_id='g4'"),
        ({"group_id": "g5", "lang": None, "text": "hi"}, "have no lang", "group_id='g5'"),
    ],
)
def test_bad_rows_are_named(tmp_path, bad, message, where):
    path = write_rows(tmp_path / "rows.jsonl", [GOOD, bad])
    with pytest.raises(DataError) as e:
        load_text_rows(cfg_for(path))
    assert message in str(e.value) and where in str(e.value) and str(path) in str(e.value)


def test_non_string_text_and_missing_columns(tmp_path):
    with pytest.raises(DataError, match="holds Int64, not text"):
        load_text_rows(cfg_for(write_rows(tmp_path / "a.jsonl", [{"group_id": "g", "lang": "en", "text": 3}])))
    with pytest.raises(DataError, match=r"missing column\(s\) \['text'\]") as e:
        load_text_rows(cfg_for(write_rows(tmp_path / "b.jsonl", [{"group_id": "g", "lang": "en", "sentence": "x"}])))
    assert "data.columns" in e.value.fix


def test_invalid_json_line_is_located(tmp_path):
    p = tmp_path / "c.jsonl"
    p.write_text(json.dumps(GOOD) + "\n{not json\n")
    with pytest.raises(DataError, match="line 2 is not valid JSON") as e:
        load_text_rows(cfg_for(p))
    assert f"{p}:2" in str(e.value)


def test_over_length_text_truncated_or_refused():
    from raysafe.extract.config import ExtractSpec
    from raysafe.models.tiny import tiny_tokenizer

    tok = tiny_tokenizer()
    texts = ["short", "x" * 100]
    full = tok(texts[1])["input_ids"]
    ids, n = tokenize_texts(tok, texts, ExtractSpec(max_length=20))  # default: keep the head, as the authors
    assert n == 1 and ids[1] == full[:20]
    ids, n = tokenize_texts(tok, texts, ExtractSpec(max_length=20, truncate="tail"))
    expected_tail = ([full[0]] + full[-19:]) if full[0] == tok.bos_token_id else full[-20:]
    assert n == 1 and ids[1] == expected_tail
    import pyarrow as pa

    meta = pa.table({"row_id": [7, 8], "group_id": ["a", "b"], "lang": ["en", "sw"]})
    with pytest.raises(DataError, match="over extract.max_length=20") as e:
        tokenize_texts(tok, texts, ExtractSpec(max_length=20, on_overflow="error"), meta)
    assert "row_id 8, group_id 'b', lang 'sw'" in str(e.value)


def test_templates_per_model_tokenizer_none_and_format_string():
    from raysafe.extract.config import ExtractSpec
    from raysafe.models.tiny import tiny_tokenizer

    tok = tiny_tokenizer(chat_template=True)
    spec = ExtractSpec(templates={"llama2-chat": "[INST] {text} [/INST] ", "qwen": "none", "gemma": "tokenizer"})
    assert spec.template_for("llama2-chat") == "[INST] {text} [/INST] " and spec.template_for("other") == "none"
    assert spec.template_identity("gemma") is True and spec.template_identity("qwen") is False
    assert ExtractSpec(chat_template=True).template_for("any") == "tokenizer"
    text = ["hello there"]
    raw, _ = tokenize_texts(tok, text, spec, template="none")
    assert raw[0] == tok(text, add_special_tokens=True)["input_ids"][0]
    inst, _ = tokenize_texts(tok, text, spec, template=spec.template_for("llama2-chat"))
    assert inst[0] == tok(["[INST] hello there [/INST] "], add_special_tokens=True)["input_ids"][0]
    own, _ = tokenize_texts(tok, text, spec, template="tokenizer")
    expected = tok.apply_chat_template(
        [{"role": "user", "content": text[0]}], add_generation_prompt=True, tokenize=True, return_dict=False
    )
    assert own[0] == list(expected["input_ids"] if isinstance(expected, dict) else expected)
    with pytest.raises(ValueError, match="format string with"):
        ExtractSpec(templates={"m": "[INST] {input} [/INST]"})
    with pytest.raises(DataError, match="has none"):
        tokenize_texts(tiny_tokenizer(chat_template=False), text, spec, template="tokenizer")


def test_missing_model_and_bad_layer(tmp_path, rows_file, tiny_llama_dir):
    with pytest.raises(ConfigError, match=r"models\.0\.path = .*no-such-model.* does not exist"):
        cfg_for(rows_file, tmp_path / "no-such-model", output_dir=str(tmp_path / "o"))
    (tmp_path / "not-a-model").mkdir()
    with pytest.raises(ModelError, match="does not exist or holds no config.json"):
        run_extract(cfg_for(rows_file, tmp_path / "not-a-model", output_dir=str(tmp_path / "o")))
    with pytest.raises(ModelError, match=r"layer index \[9\] out of range .* 4 decoder layers") as e:
        run_extract(cfg_for(rows_file, tiny_llama_dir, output_dir=str(tmp_path / "o"), extract={"layers": [1, 9]}))
    assert "0..4" in e.value.fix
    assert not (tmp_path / "o").exists()  # nothing written before validation passed


def test_activations_of_another_model_under_one_label_are_dropped(tmp_path, rows_file, tiny_llama_dir, tiny_gemma_dir):
    from raysafe.extract.flow import model_info
    from raysafe.extract.store import ActivationStore

    cfg = cfg_for(rows_file, tiny_llama_dir, output_dir=str(tmp_path / "o"))
    info, _ = model_info(cfg.models[0], cfg, "fp")
    store = ActivationStore(tmp_path / "o")
    assert store.claim("m", info) == []
    marker = store.done_path("m", 0)
    marker.parent.mkdir(parents=True)
    marker.write_text(json.dumps({"identity": info["identity"]}))
    (store.layer_dir("m", 1, "last") / "shard-00000.parquet").parent.mkdir(parents=True)
    assert store.done_shards("m") == {0} and store.claim("m", info) == [] and store.done_shards("m") == {0}
    other = cfg_for(rows_file, tiny_gemma_dir)
    info2, _ = model_info(other.models[0], other, "fp")
    changed = store.claim("m", info2)
    assert any(c.startswith("fingerprint (") for c in changed)
    assert store.done_shards("m") == set() and not store.layer_dir("m", 1, "last").exists()
    assert store.model_info("m")["identity"] == info2["identity"]
    # the same model extracted with another truncation or template: its activations are redone, the field named
    tail = cfg_for(rows_file, tiny_llama_dir, extract={"truncate": "tail"})
    assert any(c.startswith("truncate (") for c in store.claim("m", model_info(tail.models[0], tail, "fp")[0]))
    label = cfg.models[0].label
    templ = cfg_for(rows_file, tiny_llama_dir, extract={"templates": {label: "[INST] {text} [/INST] "}})
    assert any(c.startswith("chat_template (") for c in store.claim("m", model_info(templ.models[0], templ, "fp")[0]))


def test_inputs_of_other_texts_are_refused(tmp_path):
    import polars as pl

    from raysafe.atomic import write_inputs

    rows = pl.DataFrame({"text": ["a", "b", "c"]})
    assert write_inputs(tmp_path / "in", rows, 2, "fp1", "texts") == 2
    assert write_inputs(tmp_path / "in", rows, 2, "fp1", "texts") == 2
    with pytest.raises(OutputError, match=r"holds texts of other inputs \(fingerprint fp1, shard_rows 2; now fp2, 2\)"):
        write_inputs(tmp_path / "in", rows, 2, "fp2", "texts")


def test_config_errors_name_field_value_and_allowed(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(
            ExtractConfig,
            data={"models": [{"path": "x"}], "data": {"name": "safety_prompts"}, "extract": {"store_dtype": "int8"}},
        )
    msg = str(e.value)
    assert "extract.store_dtype = 'int8'" in msg and "'float16' or 'float32'" in msg
    with pytest.raises(ConfigError, match="extract.layerz: unknown field"):
        load_config(
            ExtractConfig,
            data={"models": [{"path": "x"}], "data": {"name": "safety_prompts"}, "extract": {"layerz": [1]}},
        )
    with pytest.raises(ConfigError, match="layer indices are >= 0"):
        load_config(
            ExtractConfig,
            data={"models": [{"path": "x"}], "data": {"name": "safety_prompts"}},
            overrides=["extract.layers=[-1]"],
        )


def test_overrides_parse_yaml_values(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("models: [{path: a}]\ndata: {name: safety_prompts}\n")
    cfg = load_config(ExtractConfig, p, ["ray.num_actors=4", "extract.layers=[1,2]", "models.0.name=base"])
    assert cfg.ray.num_actors == 4 and cfg.extract.layers == [1, 2] and cfg.models[0].label == "base"


def test_cli_prints_user_errors_without_traceback(tmp_path, capsys):
    p = tmp_path / "c.yaml"
    p.write_text("models: [{path: /nope}]\ndata: {name: safety_prompts}\nextract: {positions: [first]}\n")
    assert main(["extract", str(p)]) == 2
    err = capsys.readouterr().err
    assert "extract.positions.0 = 'first'" in err and "Traceback" not in err


def test_cli_help_lists_flows(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "extract" in out and "bench" in out
