"""Multilingual safety evaluation: generation, judges, metrics (docs/evaluation.md).

Modules, one job each: ``specs`` (settings), ``data`` (prompt sets, references, multiple-choice questions),
``generate`` (batched generation), ``utility`` (multiple-choice log-likelihood), ``patterns`` + ``judges``
(offline / classifier / OpenAI-compatible judges), ``stages`` (Ray Data actor stages), ``store`` (output layout,
resumable shards), ``metrics`` (pure functions), ``tables`` (metrics tables), ``plots`` (figures), ``flow``
(``EvaluateConfig``, ``run_evaluate``).
"""
