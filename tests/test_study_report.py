"""The study report's headline: base / control / MLC per language with intervals, the paired MLC − control
difference, and sentences that claim only what the intervals support — on synthetic stage outputs with a known
answer (MLC aligned across languages, control and base not; MLC safer than control in one language only)."""

from types import SimpleNamespace

import numpy as np
import polars as pl
import pyarrow as pa

from raysafe.atomic import write_inputs
from raysafe.evaluate.flow import safety_outcomes
from raysafe.evaluate.store import EvalStore
from raysafe.study.measures import claims, held_out_tables
from raysafe.study.report import _headline, consistency_headline, safety_headline
from raysafe.tables import write_table

LANGS = ["en", "ru", "zh"]
ROLES = {"base": "tiny", "mlc": "tiny-mlc", "control": "tiny-control"}


def synthetic_reader(n=40, d=24):
    rng = np.random.default_rng(0)
    common = rng.normal(size=d) * 20

    def states(aligned: bool, seed: int):
        r = np.random.default_rng(seed)
        item = r.normal(size=(n, 1, d))
        if not aligned:
            item = np.stack([item[r.permutation(n), 0] for _ in LANGS], axis=1)
        return common + item + 0.3 * r.normal(size=(n, len(LANGS), d))

    data = {"tiny": states(False, 1), "tiny-mlc": states(True, 2), "tiny-control": states(False, 3)}
    meta = pl.DataFrame(
        {
            "group_id": [f"g{i:03d}" for i in range(n) for _ in LANGS],
            "lang": [lang for _ in range(n) for lang in LANGS],
            "split": ["test"] * (n * len(LANGS)),
        }
    )

    def read(model, layer):
        return meta, data[model].reshape(-1, d).astype(np.float32)

    return read


def write_eval(root, model, safe_by_lang, n=30):
    """An evaluation store with n harmful prompts per language and the judge's verdicts for ``model``."""
    store = EvalStore(root)
    rows = [
        {"row_id": i * len(LANGS) + j, "group_id": f"h{i:03d}", "lang": lang, "set": "safety", "harmful": True}
        for i in range(n)
        for j, lang in enumerate(LANGS)
    ]
    write_inputs(store.prompts.root, pl.DataFrame(rows), len(rows), "prompts-fp", "prompts")
    verdicts = [
        {
            "row_id": r["row_id"],
            "verdict": "safe" if (int(r["group_id"][1:]) < safe_by_lang[r["lang"]] * n) else "unsafe",
        }
        for r in rows
    ]
    store.judgements(model, "offline").write(0, pa.Table.from_pylist(verdicts), {})
    return [
        {
            "model": model,
            "judge": "offline",
            "set": "safety",
            "lang": lang,
            "value": safe_by_lang[lang],
            "ci_low": max(0.0, safe_by_lang[lang] - 0.1),
            "ci_high": min(1.0, safe_by_lang[lang] + 0.1),
        }
        for lang in LANGS
    ]


def stages_for(tmp_path):
    by_layer, diffs = held_out_tables(synthetic_reader(), ROLES, [1, 2], LANGS, "en", "test", 2, resamples=300)
    cons = tmp_path / "consistency"
    info = {
        "table": str(write_table(by_layer, cons, "consistency")[0]),
        "differences": str(write_table(diffs, cons, "differences")[0]),
        "mlc_layer": 2,
        "languages": LANGS,
        "anchor": "en",
    }
    before = write_eval(tmp_path / "eval_before", "tiny", {"en": 0.1, "ru": 0.1, "zh": 0.1})
    after = write_eval(tmp_path / "eval_after", "tiny-mlc", {"en": 0.9, "ru": 0.9, "zh": 0.2})
    after += write_eval(tmp_path / "eval_after", "tiny-control", {"en": 0.9, "ru": 0.2, "zh": 0.2})
    stages = {"consistency": info}
    for name, rows in (("evaluate_before", before), ("evaluate_after", after)):
        p = write_table(pl.DataFrame(rows), tmp_path / name, "per_language")[0]
        stages[name] = {
            "output_dir": str(tmp_path / name.replace("evaluate", "eval")),
            "paths": {"per_language_parquet": str(p)},
        }
    return stages, by_layer, diffs


def test_held_out_tables_find_the_aligned_model_and_only_it(tmp_path):
    _, by_layer, diffs = stages_for(tmp_path)
    assert set(by_layer["layer"].unique()) == {1, 2} and set(diffs["layer"].unique()) == {2}
    d = diffs.filter(pl.col("measure") == "retrieval_p1")
    mc = d.filter(pl.col("comparison") == "mlc − control")
    assert mc["excludes_zero"].all() and (mc["difference"] > 0.5).all()
    cb = d.filter(pl.col("comparison") == "control − base")
    assert not cb["excludes_zero"].any()
    said = claims(diffs)
    assert any(s.startswith("retrieval_p1: MLC above control") and "ru, zh" in s for s in said)


def test_safety_headline_pairs_the_same_prompts(tmp_path):
    stages, _, _ = stages_for(tmp_path)
    out = safety_outcomes(tmp_path / "eval_after", "tiny-mlc", "offline", "safety")
    assert out.height == 90 and out["safe"].sum() == 27 + 27 + 6
    display, numbers = safety_headline(stages, ROLES, LANGS)
    mc = {r["lang"]: r for r in numbers.filter(pl.col("comparison") == "mlc − control").iter_rows(named=True)}
    assert abs(mc["ru"]["difference"] - 0.7) < 1e-9
    assert mc["ru"]["excludes_zero"] and not mc["en"]["excludes_zero"] and not mc["zh"]["excludes_zero"]
    assert mc["en"]["difference"] == 0.0
    cb = {r["lang"]: r for r in numbers.filter(pl.col("comparison") == "control − base").iter_rows(named=True)}
    assert cb["en"]["excludes_zero"] and cb["en"]["difference"] > 0.7  # training visibly changed English
    assert display.filter(pl.col("lang") == "ru")["mlc − control ≠ 0"][0] == "yes"


def test_headline_section_says_what_is_and_is_not_distinguishable(tmp_path):
    stages, _, _ = stages_for(tmp_path)
    cfg = SimpleNamespace(consistency_split="test")
    base = SimpleNamespace(label="tiny")
    trained = [SimpleNamespace(label="tiny-mlc"), SimpleNamespace(label="tiny-control")]
    lines, paths = _headline(cfg, base, trained, stages, tmp_path / "report")
    text = "\n".join(lines)
    assert (
        "safety rate, mlc − control: distinguishable from 0 (95 % interval excludes it) in ru; not distinguishable from 0 in en, zh."
        in text
    )
    assert "**retrieval_p1**" in text and "**cka**" in text
    assert paths["difference_figure"].exists() and paths["safety_differences"].exists()
    table = consistency_headline(stages, "centred_cosine")
    assert table["lang"].to_list() == ["ru", "zh"] and set(table["≠ 0"]) == {"yes"}
