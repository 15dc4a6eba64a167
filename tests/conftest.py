"""Shared test fixtures: tiny models on disk, multilingual sample rows, one local Ray instance per session."""

from __future__ import annotations

import json
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Texts in six scripts: Latin, Cyrillic, CJK (Han + kana), Arabic, Bengali, Devanagari.
MULTISCRIPT = {
    "en": ["How do I reset my password?", "Tell me a short story about a cat.", "What is the capital of France?"],
    "ru": ["Как мне сбросить пароль?", "Расскажи короткую историю о кошке.", "Какая столица Франции?"],
    "zh": ["我如何重置密码？", "给我讲一个关于猫的短故事。", "法国的首都是哪里？"],
    "ja": ["パスワードをリセットするには？", "猫の短い話をしてください。", "フランスの首都はどこですか？"],
    "ar": ["كيف أعيد تعيين كلمة المرور؟", "احكِ لي قصة قصيرة عن قطة.", "ما هي عاصمة فرنسا؟"],
    "bn": ["আমি কীভাবে পাসওয়ার্ড রিসেট করব?", "একটি বিড়াল নিয়ে ছোট গল্প বলো।", "ফ্রান্সের রাজধানী কী?"],
    "hi": ["मैं अपना पासवर्ड कैसे रीसेट करूं?", "मुझे एक बिल्ली की छोटी कहानी सुनाओ।", "फ्रांस की राजधानी क्या है?"],
}


def multiscript_rows() -> list[dict]:
    rows = []
    for lang, texts in MULTISCRIPT.items():
        for i, t in enumerate(texts):
            rows.append({"group_id": f"g{i}", "lang": lang, "text": t, "label": i % 2, "split": "train"})
    return rows


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    from raysafe.models.tiny import save_tiny

    return save_tiny(tmp_path_factory.mktemp("models") / "tiny-llama", "llama")


@pytest.fixture(scope="session")
def tiny_gemma_dir(tmp_path_factory):
    from raysafe.models.tiny import save_tiny

    return save_tiny(tmp_path_factory.mktemp("models") / "tiny-gemma3", "gemma3", seed=1)


@pytest.fixture()
def rows_file(tmp_path):
    p = tmp_path / "rows.jsonl"
    p.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in multiscript_rows()) + "\n", encoding="utf-8")
    return p


@pytest.fixture(scope="module")
def ray_local():
    """A local Ray instance per test module. Per module, not per session: a Ray Train run driven from this process
    leaves its controller actor alive after ``fit()`` returns (Ray's SIGINT handler keeps its handle), and such
    leftovers from one module must not hold the 2 CPUs that the next module's workers wait for."""
    import ray

    if ray.is_initialized():  # started by a test of an earlier module that called ray.init itself
        ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture()
def mlflow_local(tmp_path, monkeypatch):
    """A real SQLite MLflow store in a temporary directory."""
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri
