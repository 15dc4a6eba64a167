"""Sweep configs without Ray: search-space refusals (before any trial), expansion into Tune's space and trial
TrainConfigs, and the objective's pure functions against hand-computed cases."""

from __future__ import annotations

import math

import numpy as np
import polars as pl
import pytest

from raysafe.config import load_config
from raysafe.errors import ConfigError, DataError
from raysafe.sweep import metrics as M
from raysafe.sweep.objective import (
    Constraint,
    ObjectiveSpec,
    Term,
    best_index,
    dominates,
    pareto_front,
    score,
    violations,
)
from raysafe.sweep.space import (
    SearchSpace,
    grid_size,
    mixtures,
    param_space,
    trial_train_config,
    validate_space,
)
from raysafe.train.config import TrainConfig

LANGS = ["en", "zh", "ru", "ja", "ar"]


def base_cfg(**mixture) -> TrainConfig:
    return load_config(
        TrainConfig, data={"model": {"path": "unused-here"}, "mixture": {"languages": LANGS, "m": 3, **mixture}}
    )


def space(**kw) -> SearchSpace:
    return SearchSpace.model_validate(kw)


# ------------------------------------------------------------------------------------------- refusals
@pytest.mark.parametrize(
    "kw, where, bad",
    [
        ({"mixture": [{"languages": ["en", "zh", "xx"]}]}, "space.mixture[0].languages", "xx"),
        ({"mixture": [{"languages": ["en", "zh"], "weights": [1.0, -0.5]}]}, "space.mixture[0].weights", "-0.5"),
        (
            {"mixture": [{"languages": ["en", "zh", "ru"], "weights": [1.0, 0.0, 1.0]}]},
            "space.mixture[0].weights",
            "0.0",
        ),
        (
            {"mixture": [{"kind": "dirichlet", "languages": ["en", "zh"], "concentration": -1.0}]},
            "space.mixture[0].concentration",
            "-1.0",
        ),
        (
            {"mixture": [{"kind": "dominant_balanced", "languages": ["en", "zh", "ru"], "dominant": "en"}]},
            "space.mixture[0].dominant",
            "equal the uniform one",
        ),  # the anchor is drawn anyway
        (
            {"mixture": [{"kind": "dominant_balanced", "languages": ["en", "zh", "ru"], "dominant": ["zh", "de"]}]},
            "space.mixture[0].dominant",
            "['de']",
        ),
        ({"mixture": [{"languages": ["zh", "ru"]}]}, "space.mixture[0].anchor", "en"),
        ({"weight": [0.0, -0.2]}, "space.weight", "-0.2"),
        ({"beta": {"choice": [0.1, 0.0]}}, "space.beta", "0.0"),
        ({"layer": [2, 9]}, "space.layer", "9"),
        ({"layer": [0.5, 1.5]}, "space.layer", "1.5"),
        ({"m": [3, 7]}, "space.m", "7"),
        ({"m": {"uniform": [2.0, 4.0]}}, "space.m", "[2.0, 4.0]"),
        ({"mixture": [{"languages": ["en", "zh"]}]}, "space.mixture", "[3]"),  # base m=3 > 2 languages
        (
            {
                "mixture": [
                    {"name": "a", "languages": ["en", "zh", "ru"]},
                    {"name": "a", "languages": ["en", "ja", "ar"]},
                ]
            },
            "space.mixture[1].name",
            "a",
        ),
    ],
)
def test_bad_space_is_refused_naming_key_and_value(kw, where, bad):
    with pytest.raises(ConfigError) as e:
        validate_space(space(**kw), base_cfg(), depth=4)
    assert e.value.where == where
    assert bad in e.value.what, e.value.what
    assert e.value.fix


@pytest.mark.parametrize(
    "kw",
    [
        {"weight": {"grid": [0.1], "choice": [0.2]}},
        {"lr": {"loguniform": [0.0, 1e-3]}},
        {"tau": {"uniform": [0.5, 0.1]}},
        {"weight": []},
        {"mixture": {"grid": []}},
    ],
)
def test_malformed_axes_fail_validation(kw):
    with pytest.raises(ValueError):
        space(**kw)


def test_fractional_and_integer_layers_within_depth_pass():
    named = validate_space(space(layer=[1, 4, 0.25, 1.0]), base_cfg(), depth=4)
    assert list(named) == ["base"]


def test_sweep_config_refuses_objective_metric_its_trials_do_not_report(tmp_path):
    from raysafe.sweep.config import SweepConfig

    tree = {
        "train": {"model": {"path": "x"}},
        "evaluation": {"enabled": False},
        "objective": {"primary": {"metric": "safety_mean"}},
    }
    with pytest.raises(ConfigError) as e:
        load_config(SweepConfig, data=tree)
    assert "safety_mean" in str(e.value) and "evaluation.enabled=False" in str(e.value)
    tree["objective"] = {
        "primary": {"metric": "consistency_rank1_energy"},
        "pareto": [{"metric": "consistency_rank1_energy"}, {"metric": "train_loss_align", "mode": "min"}],
    }
    cfg = load_config(SweepConfig, data=tree)
    assert cfg.base.model.path == "x"
    tree["evaluation"] = {"evaluate": {"models": [{"path": "y"}]}}
    with pytest.raises(ConfigError, match="evaluation.evaluate.models is set by the sweep"):
        load_config(SweepConfig, data=tree)


def test_sweep_config_reads_the_base_train_config_from_a_yaml_path(tmp_path):
    from raysafe.sweep.config import SweepConfig

    p = tmp_path / "train.yaml"
    p.write_text("model: {path: tiny}\nmixture: {languages: [en, zh, ru], m: 3}\n")
    cfg = load_config(
        SweepConfig,
        data={
            "train": str(p),
            "evaluation": {"enabled": False},
            "objective": {
                "primary": {"metric": "train_loss_align", "mode": "min"},
                "pareto": [{"metric": "train_loss_align", "mode": "min"}, {"metric": "consistency_mean_cosine"}],
            },
        },
    )
    assert cfg.base.mixture.languages == ["en", "zh", "ru"]
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(SweepConfig, data={"train": str(tmp_path / "missing.yaml")})


# ------------------------------------------------------------------------------------------- expansion
def test_dirichlet_draws_are_seeded_normalised_and_named():
    sp = space(
        mixture=[{"kind": "dirichlet", "languages": ["en", "zh", "ru"], "concentration": 0.5, "draws": 2, "seed": 7}]
    )
    named = validate_space(sp, base_cfg(m=2), depth=4)
    assert list(named) == ["dirichlet-a0.5-s7-0", "dirichlet-a0.5-s7-1"]
    expected = np.random.default_rng(7).dirichlet([0.5, 0.5, 0.5], size=2)
    for i, spec in enumerate(named.values()):
        w = np.asarray(spec["weights"])
        assert w.sum() == pytest.approx(1.0, abs=1e-5) and (w > 0).all()
        np.testing.assert_allclose(w, np.maximum(expected[i], 1e-6) / np.maximum(expected[i], 1e-6).sum(), atol=1e-6)
    assert mixtures(sp) == named  # the same draws every time (a resumed sweep sees the same mixtures)


def test_grid_expansion_and_trial_configs():
    from ray import tune

    sp = space(
        weight=[0.0, 0.8],
        lr={"loguniform": [1e-4, 1e-2]},
        m={"choice": [2, 3]},
        mixture=[
            {"name": "uni", "languages": ["en", "zh", "ru"]},
            {
                "kind": "dominant_balanced",
                "languages": ["en", "zh", "ru", "ja"],
                "dominant": ["ru", "zh"],
                "dominant_share": 0.6,
            },
            {"languages": ["en", "zh", "ru"], "weights": [2.0, 1.0, 1.0]},
        ],
    )
    named = validate_space(sp, base_cfg(), depth=4)
    assert list(named) == ["uni", "dominant-zh+ru-0.6", "fixed2"]
    ps = param_space(sp, named, "grid")
    assert ps["weight"] == tune.grid_search([0.0, 0.8])
    assert ps["mixture"] == tune.grid_search(["uni", "dominant-zh+ru-0.6", "fixed2"])
    assert grid_size(sp, named, "grid") == 6 and grid_size(sp, named, "random") == 1
    assert "grid_search" not in param_space(sp, named, "random")["weight"].__class__.__name__.lower()

    base = base_cfg()
    cfg = trial_train_config(
        base,
        {"weight": 0.0, "lr": 3e-4, "m": 2, "mixture": "dominant-zh+ru-0.6"},
        named,
        {"ray.num_workers": 1, "checkpoint.name": "trial_x"},
    )
    assert cfg.mlc.weight == 0.0 and cfg.optim.lr == 3e-4 and cfg.mixture.m == 2
    # zh and ru share 0.6 of the sampling weight, en and ja the other 0.4 (en is drawn for every prompt anyway)
    assert cfg.mixture.preset == "none" and cfg.mixture.languages == ["en", "zh", "ru", "ja"]
    assert cfg.mixture.weights == pytest.approx([0.2, 0.3, 0.3, 0.2])
    assert cfg.ray.num_workers == 1 and cfg.checkpoint.name == "trial_x"
    assert base.mixture.m == 3 and base.mlc.weight == 0.8  # the base is untouched
    cfg2 = trial_train_config(base, {"weight": 0.8, "lr": 1e-3, "m": 3, "mixture": "fixed2"}, named)
    assert cfg2.mixture.weights == [2.0, 1.0, 1.0] and cfg2.mixture.preset == "none"


# ------------------------------------------------------------------------------------------- objective
def test_score_hand_cases():
    m = {"safety_mean": 0.8, "safety_variance": 0.1, "utility_drop": 0.02}
    assert score(m, Term(metric="safety_mean")) == 0.8
    assert score(m, Term(metric="safety_variance", mode="min")) == -0.1
    # 0.8 - 2 * 0.1 - 0.5 * 0.02 = 0.59
    s = score(
        m,
        Term(metric="safety_mean"),
        [Term(metric="safety_variance", mode="min", weight=2.0), Term(metric="utility_drop", mode="min", weight=0.5)],
    )
    assert s == pytest.approx(0.59)
    assert math.isnan(score(m, Term(metric="safety_mean"), [Term(metric="missing")]))
    assert math.isnan(score({"safety_mean": float("nan")}, Term(metric="safety_mean")))


def test_constraints_hand_cases():
    cs = [Constraint(metric="utility_drop", max=0.05), Constraint(metric="safety_mean", min=0.5)]
    assert violations({"utility_drop": 0.05, "safety_mean": 0.5}, cs) == []
    assert violations({"utility_drop": 0.06, "safety_mean": 0.7}, cs) == ["utility_drop = 0.06 > 0.05"]
    assert violations({"utility_drop": 0.0}, cs) == ["safety_mean is missing"]
    with pytest.raises(ValueError):
        Constraint(metric="x")


def test_pareto_front_hand_cases():
    terms = [Term(metric="x", mode="max"), Term(metric="y", mode="min")]
    rows = [
        {"x": 1, "y": 5},  # dominated by row 1 (x 2 > 1, y 3 < 5)
        {"x": 2, "y": 3},  # front: nothing has x >= 2 and y <= 3 with one strict
        {"x": 3, "y": 4},  # front: the largest x
        {"x": 2, "y": 6},  # dominated by row 1 (same x, larger y)
        {"x": float("nan"), "y": 1},  # NaN: out
        {"y": 0},
    ]  # missing x: out
    assert pareto_front(rows, terms) == [1, 2]
    assert pareto_front([{"x": 1, "y": 1}, {"x": 1, "y": 1}], terms) == [0, 1]  # duplicates do not dominate
    three = terms + [Term(metric="z", mode="max")]
    rows3 = [{"x": 2, "y": 3, "z": 0}, {"x": 2, "y": 3, "z": 1}, {"x": 1, "y": 1, "z": 0}]
    assert pareto_front(rows3, three) == [1, 2]
    assert dominates([2, 3], [1, 5], ["max", "min"]) and not dominates([2, 3], [2, 3], ["max", "min"])


def test_best_is_the_highest_feasible_score():
    obj = ObjectiveSpec(primary=Term(metric="s"), constraints=[Constraint(metric="u", max=0.1)])
    rows = [{"s": 0.9, "u": 0.2}, {"s": 0.7, "u": 0.05}, {"s": 0.7, "u": 0.0}, {"s": float("nan"), "u": 0.0}]
    assert best_index(rows, obj) == 1  # row 0 breaks the constraint; ties go to the earliest
    assert best_index([{"s": 1.0, "u": 0.5}], obj) is None
    with pytest.raises(ValueError):
        ObjectiveSpec(pareto=[Term(metric="s")])


# ------------------------------------------------------------------------------------------- metrics
def test_metric_names_and_eval_metrics_hand_case():
    assert M.train_name("loss/align") == "train_loss_align"
    assert M.train_name("align/rewards/accuracy") == "train_align_rewards_accuracy"
    tm = M.train_metrics({"loss/align": 0.5, "step": 3, "epoch": 0, "lr": 1e-3}, 3)
    assert tm == {"train_loss_align": 0.5, "train_lr": 1e-3, "train_step": 3.0}

    summary = pl.DataFrame(
        [
            {
                "model": "m",
                "judge": "offline",
                "set": "sp",
                "metric": "safety_rate",
                "mean": 0.75,
                "variance_pp2": 625.0,
                "agreement": 0.5,
                "utility_accuracy": 0.4,
            },
            {
                "model": "m",
                "judge": "offline",
                "set": "jb",
                "metric": "attack_success_rate",
                "mean": 0.25,
                "variance_pp2": 100.0,
                "agreement": 0.9,
                "utility_accuracy": 0.4,
            },
        ]
    )
    per_lang = pl.DataFrame(
        [
            {"model": "m", "judge": "offline", "set": "sp", "lang": "en", "safety_rate": 1.0},
            {"model": "m", "judge": "offline", "set": "sp", "lang": "zh", "safety_rate": 0.5},
            {"model": "m", "judge": "offline", "set": "jb", "lang": "en", "safety_rate": 0.75},
        ]
    )
    assert M.eval_metrics(per_lang, summary) == {
        "safety_mean": 0.75,
        "safety_variance": 625.0,
        "safety_agreement": 0.5,
        "utility_accuracy": 0.4,
        "safety_en": 1.0,
        "safety_zh": 0.5,
    }
    jb = M.eval_metrics(per_lang, summary, "jb")
    assert jb["safety_mean"] == 0.75 and jb["safety_en"] == 0.75  # 1 - attack success rate
    from raysafe.errors import OutputError

    with pytest.raises(OutputError, match="no evaluation of set 'sp' by judge 'guard'"):
        M.eval_metrics(per_lang, summary, "sp", "guard")
    d = M.baseline_deltas({"utility_accuracy": 0.35, "safety_mean": 0.9}, {"utility_accuracy": 0.4, "safety_mean": 0.6})
    assert d["utility_drop"] == pytest.approx(0.05) and d["safety_gain"] == pytest.approx(0.3)


# ------------------------------------------------------------------------------------------- before any trial
def _sweep(tiny_llama_dir, tmp_path, **space_kw):
    from raysafe.sweep.config import SweepConfig

    return load_config(
        SweepConfig,
        data={
            "name": "refused",
            "output_dir": str(tmp_path / "sweeps"),
            "train": {"model": {"path": str(tiny_llama_dir)}, "mixture": {"languages": ["en", "zh", "ru"], "m": 2}},
            "space": space_kw,
            "evaluation": {"enabled": False, "consistency": {"enabled": False}},
            "objective": {
                "primary": {"metric": "train_loss_align", "mode": "min"},
                "pareto": [{"metric": "train_loss_align", "mode": "min"}, {"metric": "train_loss_total"}],
            },
        },
    )


@pytest.mark.parametrize(
    "space_kw, err, where, bad",
    [
        ({"layer": [2, 7]}, ConfigError, "space.layer", "beyond the model's depth (4 decoder layers)"),
        ({"mixture": [{"languages": ["en", "zh", "qq"]}]}, ConfigError, "space.mixture[0].languages", "qq"),
        ({"mixture": [{"languages": ["en", "zh"], "weights": [1, -1]}]}, ConfigError, "space.mixture[0].weights", "-1"),
        # a known language the prompt variants lack: the train flow's own data check, named by the sweep key
        ({"mixture": [{"name": "with-de", "languages": ["en", "zh", "de"]}]}, DataError, "space.mixture=with-de", "de"),
    ],
)
def test_run_sweep_refuses_before_any_trial(tiny_llama_dir, tmp_path, space_kw, err, where, bad):
    from raysafe.sweep.flow import run_sweep

    cfg = _sweep(tiny_llama_dir, tmp_path, **space_kw)
    with pytest.raises(err) as e:
        run_sweep(cfg, progress=False)
    assert e.value.where.startswith(where) and bad in e.value.what, (e.value.where, e.value.what)
    assert not (tmp_path / "sweeps").exists()  # nothing was started


def test_sweep_config_refuses_an_evaluation_set_or_judge_it_does_not_run():
    from raysafe.sweep.config import SweepConfig

    base = {"train": {"model": {"path": "x"}}}
    with pytest.raises(
        ConfigError, match=r"evaluation.set 'multijail' is not one of the evaluation's sets \['safety_prompts'\]"
    ):
        load_config(SweepConfig, data={**base, "evaluation": {"set": "multijail"}})
    with pytest.raises(ConfigError, match="evaluation.judge 'guard' is not one of the evaluation's judges"):
        load_config(SweepConfig, data={**base, "evaluation": {"judge": "guard"}})
    with pytest.raises(ConfigError, match="evaluation.evaluate.generation.max_new_tokens"):
        load_config(SweepConfig, data={**base, "evaluation": {"evaluate": {"generation": {"max_new_tokens": 0}}}})


# ------------------------------------------------------------------------------------------- ASHA across a resume
def test_asha_rung_records_survive_a_new_scheduler_object(tmp_path):
    """A resumed sweep unpickles the scheduler as it was when the sweep started (empty rungs): ResumableASHA
    restores the state it saved (Tune's ``TrialScheduler.save``) before the interruption, so a lagging trial is
    still stopped against earlier ones."""
    from types import SimpleNamespace

    from ray.tune.schedulers import TrialScheduler

    from raysafe.sweep.scheduler import ResumableASHA

    state = tmp_path / "asha_state.pkl"

    def asha():
        return ResumableASHA(
            str(state), time_attr="train_step", metric="loss", mode="min", max_t=4, grace_period=2, reduction_factor=2
        )

    a, b, c = (SimpleNamespace(trial_id=x) for x in "abc")
    before = asha()
    before.on_trial_add(None, a)
    assert before.on_trial_result(None, a, {"train_step": 1, "loss": 0.69}) == TrialScheduler.CONTINUE  # no rung
    assert before.on_trial_result(None, a, {"train_step": 2, "loss": 0.40}) == TrialScheduler.CONTINUE
    assert state.exists()  # saved after every event

    after = asha()  # the interrupted sweep's scheduler, fresh from Tune's pickle
    after.on_trial_add(None, b)
    after.on_trial_add(None, c)
    assert after.on_trial_result(None, b, {"train_step": 2, "loss": 0.30}) == TrialScheduler.CONTINUE
    # c lags a and b at the rung: cutoff = median of {-0.40, -0.30} = -0.35 > -0.69
    assert after.on_trial_result(None, c, {"train_step": 2, "loss": 0.69}) == TrialScheduler.STOP

    fresh = ResumableASHA(
        str(tmp_path / "none.pkl"),
        time_attr="train_step",
        metric="loss",
        mode="min",
        max_t=4,
        grace_period=2,
        reduction_factor=2,
    )
    fresh.on_trial_add(None, c)
    assert fresh.on_trial_result(None, c, {"train_step": 2, "loss": 0.69}) == TrialScheduler.CONTINUE  # nothing to beat


# ------------------------------------------------------------------------------------------- held-out consistency
def test_heldout_consistency_matches_a_direct_computation(tiny_llama_dir):
    """The measure a trial reports equals rank-1 energy / mean cosine computed by hand from the model's hidden
    states of the same held-out items (the Ray task runs this same function)."""
    import torch

    from raysafe.config import ModelSpec, SourceSpec
    from raysafe.models.loading import load_model
    from raysafe.sweep.heldout import heldout_rows, measure

    langs = ["en", "zh", "ru"]
    rows = heldout_rows(SourceSpec(kind="fixture", name="safety_prompts"), "test", langs, max_items=3)
    assert rows.height == 9 and sorted(set(rows["lang"])) == sorted(langs)
    got = measure(
        str(tiny_llama_dir), rows.to_dicts(), langs, layer=2, max_length=512, chat_template="off", torch_threads=1
    )

    model, tok = load_model(ModelSpec(path=str(tiny_llama_dir), dtype="float32"), "cpu")
    energies, cosines = [], []
    for _, grp in rows.group_by("group_id", maintain_order=True):
        grp = grp.sort("lang")
        h = []
        for text in grp["text"]:
            ids = tok(text, return_tensors="pt")
            with torch.no_grad():
                out = model(**ids, output_hidden_states=True)
            h.append(out.hidden_states[2][0, -1].double())
        H = torch.nn.functional.normalize(torch.stack(h), dim=-1)
        s = torch.linalg.svdvals(H)
        energies.append(float(s[0] ** 2 / (s**2).sum()))
        G = H @ H.T
        cosines.append(float((G.sum() - G.diagonal().sum()) / (3 * 2)))
    assert got["consistency_items"] == 3.0
    assert got["consistency_rank1_energy"] == pytest.approx(sum(energies) / 3, abs=1e-5)
    assert got["consistency_mean_cosine"] == pytest.approx(sum(cosines) / 3, abs=1e-5)
    with pytest.raises(DataError, match="no held-out item"):
        heldout_rows(SourceSpec(kind="fixture", name="safety_prompts"), "test", ["en", "de"], max_items=3)


def test_a_sweep_directory_of_another_sweep_is_refused_before_ray_starts(tiny_llama_dir, tmp_path):
    import json

    from raysafe.errors import OutputError
    from raysafe.sweep.flow import _identity, run_sweep

    cfg = _sweep(tiny_llama_dir, tmp_path, weight=[0.0, 0.8])
    d = tmp_path / "sweeps" / "refused"
    d.mkdir(parents=True)
    other = _identity(_sweep(tiny_llama_dir, tmp_path, weight=[0.0, 0.5]))
    state = {"fingerprint": "another-sweep", "identity": other, "parent_run_id": None}
    (d / "sweep_state.json").write_text(json.dumps(state))
    with pytest.raises(OutputError, match="holds another sweep") as e:
        run_sweep(cfg, progress=False)
    assert "space.weight.grid: [0.0, 0.5] → [0.0, 0.8]" in e.value.what  # the differing field, old → new
    assert e.value.where == str(d / "sweep_state.json") and "new `name`" in e.value.fix and "--restart" in e.value.fix
    assert sorted(p.name for p in d.iterdir()) == ["sweep_state.json"]  # nothing else was written
    assert not list(d.parent.glob(".*.lock"))  # the lock was released


def test_lambda_zero_beside_mixture_keys_is_flagged(tiny_llama_dir, tmp_path, caplog):
    import logging

    from raysafe.sweep.flow import prepare

    cfg = _sweep(
        tiny_llama_dir,
        tmp_path,
        weight=[0.0, 0.8],
        mixture=[
            {"name": "a", "languages": ["en", "zh", "ru"]},
            {"name": "b", "languages": ["en", "zh", "ru"], "weights": [1, 3, 1]},
        ],
    )
    with caplog.at_level(logging.WARNING, logger="raysafe.sweep.flow"):
        out = prepare(cfg)
    assert out["total_steps"] >= 1 and list(out["named"]) == ["a", "b"] and out["depth"] == 4
    assert any("λ = 0" in r.message and "space.mixture" in r.message for r in caplog.records)
