"""The papers' data sets by hub id: each adapter reads a local copy in the set's exact published layout (a repository
snapshot with the dataset card's ``configs``, loaded by ``datasets.load_dataset`` as the hub copy would be), maps it
to a contract, and the rows pass the same checks as the bundled files. Nothing here reaches the network."""

from __future__ import annotations

import json

import polars as pl
import pytest

from raysafe.config import SourceSpec
from raysafe.data import schemas
from raysafe.data.adapters import ADAPTERS, TEXTDETOX_LANGS
from raysafe.data.sources import load_table, read_source, to_text_rows
from raysafe.errors import DataError


@pytest.fixture(autouse=True)
def _offline(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))


def _card(root, configs: dict[str, dict[str, str]]) -> None:
    """A dataset card whose YAML ``configs`` map each config's splits to data files, as on the hub."""
    lines = ["---", "configs:"]
    for name, splits in configs.items():
        lines += [f"- config_name: {name}", "  data_files:"]
        for split, path in splits.items():
            lines += [f"  - split: {split}", f"    path: {path}"]
    (root / "README.md").write_text("\n".join(lines + ["---", ""]), encoding="utf-8")


def _hub(spec_path, **kw) -> SourceSpec:
    return SourceSpec(kind="hub", path=str(spec_path), **kw)


# ------------------------------------------------------------------------------------------ textdetox
@pytest.fixture
def toxicity_repo(tmp_path):
    root = tmp_path / "multilingual_toxicity_dataset"
    (root / "data").mkdir(parents=True)
    texts = {"en": ["you idiot", "nice day", "shut up moron"], "ru": ["ты идиот", "хороший день"], "am": ["ሰላም"]}
    for lang, rows in texts.items():
        pl.DataFrame({"text": rows, "toxic": [int(i % 2 == 0) for i in range(len(rows))]}).write_parquet(
            root / "data" / f"{lang}-00000-of-00001.parquet"
        )
    _card(root, {"default": {lang: f"data/{lang}-*" for lang in texts}})
    return root


def test_textdetox_toxicity_splits_per_language(toxicity_repo):
    df = load_table(_hub(toxicity_repo, adapter="textdetox_toxicity", languages=["en", "ru"]), schemas.PROMPT_VARIANTS)
    assert df.filter(pl.col("lang") == "en")["group_id"].to_list() == ["en-0", "en-1", "en-2"]
    assert df.filter(pl.col("lang") == "ru")["label"].to_list() == [1, 0]
    assert set(df["lang"]) == {"en", "ru"} and set(df["source"]) == {"textdetox/multilingual_toxicity_dataset"}


def test_textdetox_default_languages_are_the_papers_nine(toxicity_repo):
    with pytest.raises(DataError, match="cannot load hub dataset .* split 'uk'"):  # the copy lacks uk: named
        load_table(_hub(toxicity_repo, adapter="textdetox_toxicity"), schemas.PROMPT_VARIANTS)
    assert TEXTDETOX_LANGS == ("en", "ru", "uk", "de", "es", "am", "zh", "ar", "hi")


def test_streamed_first_rows_with_limit_per_lang(toxicity_repo):
    df = load_table(
        _hub(toxicity_repo, adapter="textdetox_toxicity", languages=["en", "am"], limit_per_lang=2),
        schemas.PROMPT_VARIANTS,
    )
    assert df.group_by("lang").len().sort("lang").rows() == [("am", 1), ("en", 2)]


def test_wrong_layout_is_named(tmp_path):
    path = tmp_path / "x.parquet"
    pl.DataFrame({"sentence": ["a"], "label": [1], "lang": ["en"]}).write_parquet(path)
    with pytest.raises(DataError, match=r"lacks column\(s\) \['text', 'toxic'\] of the textdetox/") as e:
        load_table(SourceSpec(kind="file", path=str(path), adapter="textdetox_toxicity"), schemas.PROMPT_VARIANTS)
    assert "data.adapter textdetox_toxicity" in e.value.where
    with pytest.raises(DataError, match=r"gives \['parallel_detox'\] rows, not prompt_variants"):
        load_table(SourceSpec(kind="file", path=str(path), adapter="textdetox_paradetox"), schemas.PROMPT_VARIANTS)


def test_paradetox_pairs_and_flattening(tmp_path):
    root = tmp_path / "multilingual_paradetox"
    (root / "data").mkdir(parents=True)
    for lang, (tox, neu) in {"en": ("this is damn stupid", "this is unwise"), "de": ("so ein Mist", "schade")}.items():
        pl.DataFrame({"toxic_sentence": [tox, tox + "!"], "neutral_sentence": [neu, neu + "."]}).write_parquet(
            root / "data" / f"{lang}-00000-of-00001.parquet"
        )
    _card(root, {"default": {"en": "data/en-*", "de": "data/de-*"}})
    spec = _hub(root, adapter="textdetox_paradetox", contract="parallel_detox", languages=["en", "de"])
    df = load_table(spec, schemas.PARALLEL_DETOX)
    assert df.filter(pl.col("lang") == "de").select("group_id", "toxic", "neutral").row(1) == (
        "de-1",
        "so ein Mist!",
        "schade.",
    )
    flat = to_text_rows(df, schemas.PARALLEL_DETOX.name)
    assert flat.height == 8 and flat.filter(pl.col("label") == 1)["text"].str.contains("Mist|damn").all()


# ---------------------------------------------------------------------------------------------- MultiJail
MULTIJAIL_HEADER = "\ufeffid,source,tags,en,zh,it,vi,ar,ko,th,bn,sw,jv\n"


def test_multijail_wide_csv_to_parallel_variants(tmp_path):
    root = tmp_path / "MultiJail"
    root.mkdir()
    rows = []
    for i, tag in ((0, "['Violence']"), (7, "['Hate speech', 'Discrimination']")):
        texts = [f"{lang} prompt {i}" for lang in ("en", "zh", "it", "vi", "ar", "ko", "th", "bn", "sw", "jv")]
        rows.append(",".join([str(i), "anthropics", f'"{tag}"', *texts]))
    (root / "MultiJail.csv").write_text(MULTIJAIL_HEADER + "\n".join(rows) + "\n", encoding="utf-8")
    df = load_table(_hub(root, adapter="multijail"), schemas.PROMPT_VARIANTS)
    assert df.height == 20 and df["group_id"].unique().sort().to_list() == ["multijail-0", "multijail-7"]
    sw = df.filter((pl.col("lang") == "sw") & (pl.col("group_id") == "multijail-7")).row(0, named=True)
    assert sw["text"] == "sw prompt 7" and sw["label"] == 1 and sw["category"] == "['Hate speech', 'Discrimination']"
    few = load_table(_hub(root, adapter="multijail", languages=["en", "bn"], limit_per_lang=1), schemas.PROMPT_VARIANTS)
    assert few.select("group_id", "lang").rows() == [("multijail-0", "en"), ("multijail-0", "bn")]


# -------------------------------------------------------------------------------------------------- MMMLU
def test_mmmlu_subsets_per_language_through_the_evaluation(tmp_path):
    from raysafe.evaluate.config import UtilitySpec
    from raysafe.evaluate.data import load_mc

    root = tmp_path / "MMMLU"
    (root / "test").mkdir(parents=True)
    header = ",Question,A,B,C,D,Answer,Subject\n"  # pandas' unnamed index column comes first
    (root / "test" / "mmlu_AR-XY.csv").write_text(
        header + '0,سؤال أ,1,2,3,4,B,abstract_algebra\n1,"سؤال, ب",x,y,z,w,D,anatomy\n', encoding="utf-8"
    )
    (root / "test" / "mmlu_ZH-CN.csv").write_text(header + "0,问题甲,1,2,3,4,B,abstract_algebra\n", encoding="utf-8")
    _card(root, {"AR_XY": {"test": "test/mmlu_AR-XY.csv"}, "ZH_CN": {"test": "test/mmlu_ZH-CN.csv"}})
    mc = load_mc(UtilitySpec(sources=[_hub(root, adapter="mmmlu", languages=["ar", "zh"])]))
    assert mc.select("group_id", "lang", "answer").rows() == [("q-0", "ar", 1), ("q-1", "ar", 3), ("q-0", "zh", 1)]
    assert mc.filter(pl.col("lang") == "ar")["question"].to_list()[1] == "سؤال, ب"
    assert mc["choices"].to_list()[1] == ["x", "y", "z", "w"]
    with pytest.raises(DataError, match=r"no subset for language\(s\) \['ru'\]"):
        read_source(_hub(root, adapter="mmmlu", languages=["ru"]))


# -------------------------------------------------------------------------------------------- PKU-SafeRLHF
def _pku_row(i: int, safer: int) -> dict:
    return {
        "prompt": f"How do I do harmful thing {i}?",
        "response_0": f"Here is how {i}" if safer == 1 else f"I can't help with {i}",
        "response_1": f"I won't help with {i}" if safer == 1 else f"Sure, step one {i}",
        "prompt_source": "Alpaca3-8B",
        "response_0_source": "Alpaca3-8B",
        "response_1_source": "Alpaca3-8B",
        "is_response_0_safe": safer == 0,
        "is_response_1_safe": safer == 1,
        "response_0_harm_category": {"Violence": safer == 1},
        "response_1_harm_category": {"Violence": safer == 0},
        "response_0_severity_level": 0,
        "response_1_severity_level": 2,
        "better_response_id": 1 - safer,
        "safer_response_id": safer,
        "response_0_sha256": f"{i}a",
        "response_1_sha256": f"{i}b",
    }


def test_pku_saferlhf_safer_answer_is_chosen(tmp_path):
    root = tmp_path / "PKU-SafeRLHF"
    (root / "data" / "Alpaca3-8B").mkdir(parents=True)
    for split, rows in (("train", [_pku_row(i, i % 2) for i in range(3)]), ("test", [_pku_row(0, 0), _pku_row(0, 1)])):
        (root / "data" / "Alpaca3-8B" / f"{split}.jsonl").write_text(
            "\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8"
        )
    paths = {s: f"data/Alpaca3-8B/{s}.jsonl" for s in ("train", "test")}
    _card(root, {"default": paths, "alpaca3-8b": paths})
    pairs = load_table(_hub(root, adapter="pku_saferlhf", subset="alpaca3-8b"), schemas.PREFERENCE_PAIRS)
    assert pairs.height == 3 and pairs["chosen"].to_list() == [
        "I can't help with 0",
        "I won't help with 1",
        "I can't help with 2",
    ]
    assert pairs["rejected"].to_list()[1] == "Here is how 1" and set(pairs["lang"]) == {"en"}
    prompts = load_table(_hub(root, adapter="pku_saferlhf", split="test"), schemas.PROMPT_VARIANTS)
    assert prompts.select("group_id", "lang", "text").rows() == [("pku-0", "en", "How do I do harmful thing 0?")]


# ------------------------------------------------------------------------------------ MLC release format
def _mlc_item(i: int, langs=("zh", "ar", "ru", "ja", "bn", "sw", "ur", "ps", "ku")) -> dict:
    item = {
        "prompt": [{"from": "human", "value": f"harmful question {i}"}],
        "chosen": {"from": "gpt", "value": f"safe answer {i}"},
        "rejected": {"from": "gpt", "value": f"unsafe answer {i}"},
    }
    for lang in langs:
        item[f"prompt_{lang}"] = [{"from": "human", "value": f"{lang} question {i}"}]
    return item


def test_mlc_release_pairs_and_variants_feed_training(tmp_path):
    from raysafe.train.config import MixtureSpec, TrainDataSpec
    from raysafe.train.data import load_samples

    path = tmp_path / "multilin-pku-saferlhf-alpaca3-8b-train.json"
    path.write_text(json.dumps([_mlc_item(i) for i in range(4)], ensure_ascii=False, indent=2), encoding="utf-8")
    spec = SourceSpec(kind="file", path=str(path), adapter="mlc_pku_multilingual")
    data = TrainDataSpec(pairs=spec, variants=spec, split=None)
    samples = load_samples(data, MixtureSpec(languages=["en", "zh", "sw"], m=3), seed=0)
    first = samples.row(0, named=True)
    assert first["chosen"] == "safe answer 0" and first["rejected"] == "unsafe answer 0"
    assert dict(zip(first["variant_langs"], first["variant_texts"])) == {
        "en": "harmful question 0",
        "zh": "zh question 0",
        "sw": "sw question 0",
    }
    variants = load_table(spec, schemas.PROMPT_VARIANTS)
    assert variants.height == 40 and sorted(set(variants["lang"])) == sorted(
        ["en", "zh", "ar", "ru", "ja", "bn", "sw", "ur", "ps", "ku"]
    )


def test_mlc_safety_test_jsonl_and_multi_turn_refused(tmp_path):
    path = tmp_path / "pku_saferlhf_safety_test.jsonl"
    item = _mlc_item(0, langs=("zh",))
    path.write_text(json.dumps(item, ensure_ascii=False) + "\n", encoding="utf-8")
    spec = SourceSpec(kind="file", path=str(path), adapter="mlc_pku_multilingual", contract="prompt_variants")
    assert load_table(spec, schemas.PROMPT_VARIANTS).select("lang", "text").rows() == [
        ("en", "harmful question 0"),
        ("zh", "zh question 0"),
    ]
    item["prompt"] = item["prompt"] * 2
    path.write_text(json.dumps(item, ensure_ascii=False) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match="holds 2 turns") as e:
        load_table(spec, schemas.PROMPT_VARIANTS)
    assert e.value.where == f"{path}, row 0, field prompt"


def test_every_adapter_documented():
    text = (pytest.importorskip("pathlib").Path(__file__).parents[1] / "docs" / "data.md").read_text()
    for a in ADAPTERS.values():
        assert f"`{a.name}`" in text and a.hub_id in text and a.card in text
