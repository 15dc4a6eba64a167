"""`raysafe translate`: prompt and preference sets → checked variants in N languages (docs/translate.md).

Modules, one job each: ``config`` (TranslateConfig), ``codes`` (language codes of MT models and identifiers),
``translators`` (HF seq2seq MT, LLM via the evaluation's generation backend), ``endpoint`` (OpenAI-compatible
endpoint), ``quality`` (scores and flags), ``store`` (shards, markers, identity), ``stages`` (one cell; the Ray Data
actor stage), ``report`` (contract files, report, figures), ``flow`` (``run_translate``), ``bench`` (actor pool vs
plain loop).
"""
