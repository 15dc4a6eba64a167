"""Translation pieces without Ray: scores against closed forms and an independent chrF, flags, language codes, the
tiny seq2seq translators, one cell written and scored in-process, and the config's refusals."""

from __future__ import annotations

import math
from collections import Counter

import polars as pl
import pytest

from raysafe.config import load_config
from raysafe.errors import ConfigError, DataError
from raysafe.translate.codes import model_code_candidates
from raysafe.translate.config import TranslateConfig, TranslatorSpec
from raysafe.translate.quality import Thresholds, chrf, flag_reasons, length_ratio, unk_rate
from raysafe.translate.store import TranslationStore
from raysafe.translate.translators import Seq2SeqTranslator, llm_request

T = Thresholds(
    min_langid_prob=0.5,
    min_chrf=20.0,
    min_length_ratio=0.2,
    max_length_ratio=4.0,
    max_unk_rate=0.05,
    langid_accept={"ps": ["fa"]},
)


def independent_chrf(hyp: str, ref: str, order: int = 6, beta: float = 2.0) -> float:
    """chrF (Popović 2015) written from the definition: character n-grams (whitespace removed) for n = 1..6,
    precision and recall averaged over n, then F_beta, x100."""
    h, r = hyp.replace(" ", ""), ref.replace(" ", "")
    ps, rs = [], []
    for n in range(1, order + 1):
        hc = Counter(h[i : i + n] for i in range(len(h) - n + 1))
        rc = Counter(r[i : i + n] for i in range(len(r) - n + 1))
        match = sum((hc & rc).values())
        ps.append(match / sum(hc.values()) if hc else 0.0)
        rs.append(match / sum(rc.values()) if rc else 0.0)
    p, rec = sum(ps) / order, sum(rs) / order
    return 0.0 if p + rec == 0 else 100 * (1 + beta**2) * p * rec / (beta**2 * p + rec)


@pytest.mark.parametrize(
    "hyp,ref",
    [
        ("the cat sat on the mat", "the cat sat on the mat"),
        ("the cat sat on the mat", "a dog lay on the rug"),
        ("How can I reset my password?", "How do I reset my password?"),
        ("zzzzzzzz", "abcdefgh"),
    ],
)
def test_chrf_matches_the_definition(hyp, ref):
    assert chrf(hyp, ref) == pytest.approx(independent_chrf(hyp, ref), abs=1e-6)


def test_chrf_bounds_and_length_ratio_closed_forms():
    assert chrf("same text here", "same text here") == pytest.approx(100.0)
    assert chrf("zzzzzzzz", "abcdefgh") == 0.0
    assert length_ratio("abc", "abcdef") == 0.5
    assert length_ratio("  abcdef ", "abc") == 2.0
    assert math.isnan(length_ratio("x", "   "))
    assert unk_rate(1, 4) == 0.25 and math.isnan(unk_rate(None, 4)) and math.isnan(unk_rate(0, 0))


def reasons(**kw):
    base = dict(
        target="zh", text="你好", langid_lang="zh", langid_prob=0.99, chrf_round_trip=60.0, ratio=1.0, unk=0.0, t=T
    )
    return flag_reasons(**{**base, **kw})


def test_each_check_flags_alone_and_unmeasured_scores_never_flag():
    assert reasons() == []
    assert reasons(text="  ") == ["empty"]
    assert reasons(langid_lang="ja") == ["langid"]
    assert reasons(langid_prob=0.3) == ["langid"]
    assert reasons(chrf_round_trip=10.0) == ["round_trip"]
    assert reasons(ratio=0.1) == ["length"] and reasons(ratio=5.0) == ["length"]
    assert reasons(unk=0.2) == ["unk"]
    assert reasons(langid_lang="ja", chrf_round_trip=1.0, ratio=9.0) == ["langid", "round_trip", "length"]
    # identifier off, no round trip, no token counts: nothing to hold against the row
    assert reasons(langid_lang=None, langid_prob=None, chrf_round_trip=None, unk=math.nan) == []
    # accepted alternatives and raysafe → langid code mapping (Kurmanji is reported as ku)
    assert reasons(target="ps", langid_lang="fa") == []
    assert reasons(target="kmr", langid_lang="ku") == []


def test_language_codes_per_family():
    assert model_code_candidates("zh", "nllb", {}) == ["zho_Hans"]
    assert model_code_candidates("ku", "nllb", {}) == ["kmr_Latn"]
    assert model_code_candidates("ar", "nllb", {}) == ["arb_Arab"]
    assert model_code_candidates("zh", "nllb", {"zh": "zho_Hant"}) == ["zho_Hant"]
    assert model_code_candidates("zh", "m2m100", {}) == ["__zh__"]
    assert model_code_candidates("zh", "marian", {}) == [">>zho_Hans<<", ">>zho<<", ">>zh<<"]
    assert model_code_candidates("xx", "nllb", {}) == []


@pytest.fixture(scope="module")
def tiny_m2m(tmp_path_factory):
    from raysafe.models.tiny import save_tiny_mt

    return save_tiny_mt(tmp_path_factory.mktemp("mt") / "m2m", "m2m100", ["__en__", "__zh__", "__ru__"])


@pytest.fixture(scope="module")
def tiny_marian(tmp_path_factory):
    from raysafe.models.tiny import save_tiny_mt

    return save_tiny_mt(tmp_path_factory.mktemp("mt") / "marian", "marian", [">>zho<<", ">>rus<<"], seed=1)


def spec(path, **kw) -> TranslatorSpec:
    return TranslatorSpec(kind="seq2seq", model={"path": str(path), "name": "tiny"}, max_new_tokens=6, **kw)


def test_m2m100_forces_the_target_code_and_keeps_input_order(tiny_m2m):
    tr = Seq2SeqTranslator(spec(tiny_m2m))
    loaded = tr.load(tr.spec.model)
    assert loaded.family == "m2m100"
    texts = ["How do I reset my password?", "Hi", "Tell me a short story about a cat, please."]
    out = tr.translate(texts, "en", "zh")
    assert len(out) == 3 and all(o.n_tokens is not None and o.n_unk == 0 for o in out)
    rev = tr.translate(texts[::-1], "en", "zh")
    assert [o.text for o in rev] == [o.text for o in out][::-1]
    # the first generated token after the decoder start is the target language's code
    import torch

    ids = loaded.tok("Hi", add_special_tokens=False)["input_ids"]
    zh = loaded.tok.convert_tokens_to_ids("__zh__")
    en = loaded.tok.convert_tokens_to_ids("__en__")
    gen = loaded.model.generate(
        input_ids=torch.tensor([[en, *ids, 2]]), max_new_tokens=3, forced_bos_token_id=zh, do_sample=False
    )
    assert gen[0, 1].item() == zh


def test_marian_multi_target_takes_its_target_token(tiny_marian):
    tr = Seq2SeqTranslator(spec(tiny_marian))
    assert tr.load(tr.spec.model).family == "marian"
    assert len(tr.translate(["one", "two"], "en", "ru")) == 2
    with pytest.raises(ConfigError, match="no language token for 'ja'") as e:
        tr.check("en", "ja")
    assert "translator.lang_codes" in e.value.fix


def test_missing_code_refused_before_any_model_load(tiny_m2m):
    tr = Seq2SeqTranslator(spec(tiny_m2m))
    with pytest.raises(ConfigError, match=r"no language token for 'ku' \(tried \['__ku__'\]\)"):
        tr.check("en", "ku")
    assert all(v.model is None for v in tr._loaded.values())  # the check read the tokenizer only


def test_directions_pick_a_model_per_direction(tiny_m2m, tiny_marian):
    from raysafe.translate.translators import direction_model

    s = TranslatorSpec(
        kind="seq2seq", directions={"en-ru": {"path": str(tiny_marian)}, "ru-en": {"path": str(tiny_m2m)}}
    )
    assert direction_model(s, "en", "ru").path == str(tiny_marian)
    with pytest.raises(ConfigError, match="no model translates en -> zh"):
        direction_model(s, "en", "zh")


def test_cell_is_scored_and_a_too_long_text_names_its_row(tiny_m2m, tmp_path):
    from translate_fakes import says_zh

    from raysafe.translate.stages import translate_cell

    store = TranslationStore(tmp_path)
    rows = pl.DataFrame({"row_id": [0, 1], "group_id": ["g0", "g1"], "text": ["Hello there", "A" * 40]})
    store.write_inputs(rows, 10, "fp")
    tr = Seq2SeqTranslator(spec(tiny_m2m, max_input_tokens=20))
    with pytest.raises(DataError, match="over translator.max_input_tokens=20") as e:
        translate_cell(tr, says_zh, store, 0, "zh", "en", ["text"], True)
    assert "group_id 'g1'" in e.value.where and "field 'text'" in e.value.where
    assert not store.done_shards("zh")

    tr = Seq2SeqTranslator(spec(tiny_m2m))
    s = translate_cell(tr, says_zh, store, 0, "zh", "en", ["text"], True)
    assert s["rows"] == 2 and store.done_shards("zh") == {0}
    cell = pl.read_parquet(store.shard_path("zh", 0))
    assert cell["group_id"].to_list() == ["g0", "g1"] and set(cell["langid_lang"]) == {"zh"}
    for r in cell.iter_rows(named=True):
        assert r["length_ratio"] == pytest.approx(len(r["text"].strip()) / len(r["source_text"]))
        if r["back_text"] is not None:
            assert r["chrf_round_trip"] == pytest.approx(chrf(r["back_text"], r["source_text"]))


def test_llm_request_and_config_refusals():
    s = TranslatorSpec(kind="openai", endpoint_model="m")
    assert llm_request(s, "Hi", "en", "ku").endswith("Hi") and "Kurdish (Kurmanji" in llm_request(s, "Hi", "en", "ku")
    base = {
        "data": {"kind": "fixture", "name": "safety_prompts"},
        "translator": {"kind": "seq2seq", "model": {"path": "x"}},
        "translate": {"target_langs": ["zh"]},
    }
    assert load_config(TranslateConfig, data=base).translate.source_lang == "en"
    for bad, msg in (
        ({"translate": {"target_langs": ["zz"]}}, "unknown language code"),
        ({"translate": {"target_langs": ["en"]}}, "source language"),
        ({"translator": {"kind": "openai"}}, "endpoint_model"),
        ({"translator": {"kind": "llm"}}, "needs `model`"),
        ({"quality": {"langid": "fasttext"}}, "module:function"),
    ):
        with pytest.raises(ConfigError, match=msg):
            load_config(TranslateConfig, data={**base, **bad})


def test_vllm_backend_is_refused_with_a_clear_error():
    from raysafe.translate.translators import LLMTranslator

    with pytest.raises(ConfigError, match="vLLM backend is not available"):
        LLMTranslator(TranslatorSpec(kind="llm", model={"path": "x"}, backend="vllm"))


def test_unknown_token_rate_warns_per_language():
    from raysafe.translate.flow import unk_warnings

    report = pl.DataFrame({"lang": ["zh", "ku", "ru"], "unk_rate_mean": [0.0, 0.31, None]})
    (w,) = unk_warnings(report, 0.05)
    assert w.startswith("ku: 31.0 % of output tokens are unknown") and "max_unk_rate=0.05" in w


def test_llm_translator_through_the_generation_backend(tiny_llama_dir):
    from raysafe.translate.translators import LLMTranslator

    s = TranslatorSpec(
        kind="llm", model={"path": str(tiny_llama_dir)}, max_new_tokens=5, stop_strings=["\n"], batch_size=2
    )
    tr = LLMTranslator(s)
    out = tr.translate(["Hello", "How are you today?", "Bye"], "en", "ja")
    assert len(out) == 3 and all("\n" not in o.text for o in out)
    with pytest.raises(DataError, match="max_input_tokens"):
        LLMTranslator(s.model_copy(update={"max_input_tokens": 8})).translate(["x" * 40], "en", "ja")


def test_translator_identity_tells_two_checkpoints_of_one_config_apart(tmp_path):
    from raysafe.models.tiny import save_tiny_mt
    from raysafe.translate.translators import translator_identity

    a = save_tiny_mt(tmp_path / "a", "m2m100", ["__en__", "__zh__"], seed=0)
    b = save_tiny_mt(tmp_path / "b", "m2m100", ["__en__", "__zh__"], seed=1)
    assert (a / "config.json").read_bytes() == (b / "config.json").read_bytes()
    ia = translator_identity(spec(a), [("en", "zh")])
    assert ia == translator_identity(spec(a), [("en", "zh")])
    assert ia["models"] != translator_identity(spec(b), [("en", "zh")])["models"]
    assert ia != translator_identity(spec(a, num_beams=4), [("en", "zh")])
    assert ia == translator_identity(spec(a, batch_size=3), [("en", "zh")])  # a throughput knob


def test_pairs_table_flags_a_pair_when_any_field_fails_and_counts_per_language():
    from raysafe.translate.report import flag, language_report, pairs_table, variants_table

    inputs = pl.DataFrame(
        {"row_id": [0, 1], "group_id": ["p0", "p1"], "prompt": ["P0", "P1"], "chosen": ["C0", "C1"],
         "rejected": ["R0", "R1"], "split": ["train", "test"]}
    )  # fmt: skip
    rows = []
    for row_id in (0, 1):
        for field in ("prompt", "chosen", "rejected"):
            bad = row_id == 1 and field == "rejected"
            rows.append(
                {"row_id": row_id, "group_id": f"p{row_id}", "lang": "zh", "field": field,
                 "source_text": f"{field}{row_id}", "text": f"译{field}{row_id}", "back_text": None,
                 "n_tokens": 3, "n_unk": 0, "langid_lang": "ja" if bad else "zh", "langid_prob": 0.9,
                 "chrf_round_trip": None, "length_ratio": 1.0, "unk_rate": 0.0}
            )  # fmt: skip
    flagged = flag(pl.DataFrame(rows), T)
    pairs = pairs_table(inputs, flagged, "en", exclude_flagged=False)
    zh = pairs.filter(pl.col("lang") == "zh").sort("group_id")
    assert zh["flagged"].to_list() == [False, True] and zh["flag_reasons"].to_list() == ["", "rejected:langid"]
    assert zh["chosen"].to_list() == ["译chosen0", "译chosen1"] and zh["split"].to_list() == ["train", "test"]
    assert pairs_table(inputs, flagged, "en", exclude_flagged=True).filter(pl.col("lang") == "zh").height == 1
    # the pair's prompt passed: its prompt variant is kept
    assert variants_table(inputs, flagged, "en", "prompt", True).filter(pl.col("lang") == "zh").height == 2
    units = flagged.group_by(["row_id", "lang"]).agg(pl.col("flagged").any())
    rep = language_report(flagged, 2, units).row(0, named=True)
    assert (rep["translated"], rep["flagged"], rep["kept"], rep["flag_langid"], rep["texts"]) == (2, 1, 1, 1, 6)


def test_preflight_refuses_an_unimportable_identifier_and_warns_on_uncovered_languages():
    from raysafe.translate.flow import preflight

    base = {
        "data": {"kind": "fixture", "name": "safety_prompts"},
        "translator": {"kind": "llm", "model": {"path": "x"}},
        "translate": {"target_langs": ["zh", "yo"]},
    }
    (w,) = preflight(load_config(TranslateConfig, data=base))
    assert "does not know ['yo']" in w and "not language-checked" in w
    bad = {**base, "quality": {"langid": "no_such_module:identify"}}
    with pytest.raises(ConfigError, match="cannot import the language identifier 'no_such_module:identify'") as e:
        preflight(load_config(TranslateConfig, data=bad))
    assert e.value.where == "quality.langid"
