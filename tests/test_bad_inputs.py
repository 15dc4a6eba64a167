"""Bad input found by trying it: each gets a named error (file, row, field, what to do), before any Ray worker."""

from __future__ import annotations

import json

import pytest

from raysafe.config import SourceSpec, load_config
from raysafe.data import schemas
from raysafe.data.sources import load_table
from raysafe.errors import ConfigError, DataError
from raysafe.extract.config import ExtractConfig
from raysafe.train.config import TrainConfig

GOOD = {"group_id": "g1", "lang": "en", "text": "hello"}


def _jsonl(tmp_path, rows, name="rows.jsonl"):
    path = tmp_path / name
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r, ensure_ascii=False) for r in rows) + "\n")
    return path


def _load(path, contract=schemas.PROMPT_VARIANTS, **spec):
    return load_table(SourceSpec(kind="file", path=str(path), **spec), contract)


def test_jsonl_row_that_is_not_an_object(tmp_path):
    path = _jsonl(tmp_path, [GOOD, '["g2", "en", "hi"]'])
    with pytest.raises(DataError, match="line 2 holds a JSON list, not an object") as e:
        _load(path)
    assert e.value.where == f"{path}:2" and "one object per line" in e.value.fix


def test_non_utf8_jsonl(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(
        (json.dumps(GOOD) + "\n").encode() + '{"group_id": "g2", "lang": "de", "text": "Grüße"}\n'.encode("latin-1")
    )
    with pytest.raises(DataError, match="line 2 is not UTF-8") as e:
        _load(path)
    assert e.value.where == f"{path}:2" and "UTF-8" in e.value.fix


def test_number_where_a_string_is_expected_is_not_coerced(tmp_path):
    path = _jsonl(tmp_path, [GOOD, {"group_id": "g2", "lang": "en", "text": 42}])
    with pytest.raises(
        DataError, match=r"field 'text' on line 2 holds a number \(42\) where line 1 holds a string"
    ) as e:
        _load(path)
    assert e.value.where == f"{path}:2, field text"


@pytest.mark.parametrize("contract", [schemas.PROMPT_VARIANTS, schemas.PARALLEL_DETOX])
def test_duplicate_group_and_language(tmp_path, contract):
    row = (
        GOOD if contract is schemas.PROMPT_VARIANTS else {"group_id": "g1", "lang": "en", "toxic": "a", "neutral": "b"}
    )
    other = {**row, "lang": "de"}
    path = _jsonl(tmp_path, [row, other, {**row}])
    with pytest.raises(DataError, match=r"2 rows share their \(group_id, lang\)") as e:
        _load(path, contract)
    assert "row_id=0, group_id='g1', lang='en'; row_id=2" in e.value.where and str(path) in e.value.where


def test_duplicate_pair_ids_and_equal_answers(tmp_path):
    pair = {"group_id": "p1", "prompt": "q", "chosen": "no", "rejected": "yes"}
    with pytest.raises(DataError, match=r"share their \(group_id\)") as e:
        _load(_jsonl(tmp_path, [pair, {**pair, "chosen": "never"}]), schemas.PREFERENCE_PAIRS)
    assert "group_id='p1'" in e.value.where
    same = {**pair, "group_id": "p2", "rejected": " no "}
    with pytest.raises(DataError, match="1 row.* have chosen equal to rejected") as e:
        _load(_jsonl(tmp_path, [pair, same], "same.jsonl"), schemas.PREFERENCE_PAIRS)
    assert "row_id=1, group_id='p2'" in e.value.where


def test_label_missing_from_label_map(tmp_path):
    rows = [{**GOOD, "label": "toxic"}, {"group_id": "g2", "lang": "en", "text": "x", "label": "offensive"}]
    with pytest.raises(DataError, match=r"label value\(s\) \['offensive'\] are not in data.label_map") as e:
        _load(_jsonl(tmp_path, rows), label_map={"toxic": 1, "neutral": 0})
    assert e.value.where.endswith("field label, row(s) 1") and "data.label_map" in e.value.fix
    ok = _load(_jsonl(tmp_path, rows[:1], "ok.jsonl"), label_map={"toxic": 1})
    assert ok["label"].to_list() == [1]


def test_language_missing_from_the_data(tmp_path):
    with pytest.raises(DataError, match=r"data.languages asks for \['sw'\], which the source has no rows in") as e:
        _load(_jsonl(tmp_path, [GOOD]), languages=["en", "sw"])
    assert "['en']" in e.value.fix


@pytest.mark.parametrize(
    "data,message",
    [
        ({"data": {"max_length": 256, "max_prompt_length": 256}}, "leaves no room for an answer"),
        ({"mixture": {"languages": ["en", "de"], "m": 3}}, "mixture.m=3 variants per prompt cannot be drawn from 2"),
        ({"mixture": {"languages": ["de", "fr"], "m": 2}}, "mixture.anchor 'en' is not in mixture.languages"),
        ({"mixture": {"languages": ["en", "de"], "m": 2, "weights": [1.0]}}, "mixture.weights has 1 values for 2"),
        ({"mixture": {"languages": ["en", "en", "de"], "m": 2}}, r"mixture.languages repeats \['en'\]"),
        ({"data": {"pairs": {"kind": "file", "path": __file__, "split": "train"}}}, "applies to hub sources only"),
        ({"data": {"pairs": {"name": "preference_pairs", "adapter": "pku_saferlhf"}}}, "remove data.adapter"),
        (
            {"data": {"variants": {"kind": "hub", "path": "x/y", "lang": "en", "subsets_by_lang": {"de": "de"}}}},
            "remove data.lang",
        ),
    ],
)
def test_cross_field_contradictions(data, message):
    with pytest.raises(ConfigError, match=message):
        load_config(TrainConfig, data={"model": {"path": "m"}, **data})


def test_where_names_the_file_and_marks_the_override_not_the_whole_list(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: {path: m}\n")
    overrides = ["ray.num_workers=2", "optim.lr=-1", "seed=3", "optim.epochs=2"]
    with pytest.raises(ConfigError) as e:
        load_config(TrainConfig, path, overrides)
    assert e.value.where == str(path)
    assert "optim.lr = -1 [from --set optim.lr=-1]" in e.value.what
    assert "seed=3" not in str(e.value)
    with pytest.raises(ConfigError, match="did you mean `lr`") as e:
        load_config(TrainConfig, path, ["optim.lrr=1e-6"])
    assert "fields here:" in e.value.what and "weight_decay" in e.value.what


def test_prompt_over_the_limit_fails_on_the_driver_before_ray(tmp_path, tiny_llama_dir):
    import ray

    from raysafe.extract.flow import run_extract

    path = _jsonl(tmp_path, [GOOD, {"group_id": "g2", "lang": "sw", "text": "habari " * 200}])
    cfg = load_config(
        ExtractConfig,
        data={
            "models": [{"path": str(tiny_llama_dir)}],
            "data": {"kind": "file", "path": str(path)},
            "extract": {"max_length": 32, "on_overflow": "error"},
            "output_dir": str(tmp_path / "out"),
            "tracking": {"enabled": False},
        },
    )
    was_running = ray.is_initialized()
    with pytest.raises(DataError, match="over extract.max_length=32") as e:
        run_extract(cfg, progress=False)
    assert "group_id 'g2', lang 'sw'" in e.value.where
    assert ray.is_initialized() == was_running and not (tmp_path / "out").exists()
