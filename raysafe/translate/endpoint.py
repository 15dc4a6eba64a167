"""An OpenAI-compatible ``/chat/completions`` endpoint as a translator (httpx).

Safety rules, the same as the judge's: the base URL (environment variable ``translator.url_env``) must be https,
except on the loopback interface (a local server); redirects are not followed blindly — only 307/308 (which keep the
POST and its body), at most 3 hops, each to an allowed URL, and the bearer key is sent only to the origin it was
given for (never across a cross-origin redirect); 408/409/429/5xx and connection errors are retried with exponential
backoff (``Retry-After`` honoured up to 30 s); a 200 reply that is not JSON is an error naming its content type and
first bytes, never a silent empty translation.
"""

from __future__ import annotations

import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urljoin, urlsplit

from raysafe.errors import ConfigError, ModelError
from raysafe.evaluate.config import endpoint_url_problem
from raysafe.translate.config import TranslatorSpec
from raysafe.translate.translators import Translation, llm_request

RETRY_STATUS = frozenset({408, 409, 429, 500, 502, 503, 504})
MAX_REDIRECTS = 3


def check_url(url: str, where: str) -> None:
    """The judge's rule (``evaluate.config.endpoint_url_problem``): https, or http to a loopback host; no credentials."""
    problem = endpoint_url_problem(url)
    if problem:
        raise ConfigError(
            f"the translation endpoint is refused: {problem}",
            where=where,
            fix="give the endpoint's https:// URL (or reach a local server through http://127.0.0.1:<port>/v1); the "
            "key belongs in the key_env variable",
        )


def origin(url: str) -> tuple[str, str, int | None]:
    p = urlsplit(url)
    return p.scheme, (p.hostname or "").lower(), p.port or {"http": 80, "https": 443}.get(p.scheme)


def endpoint_base(spec: TranslatorSpec) -> str:
    url = os.environ.get(spec.url_env, "").strip()
    if not url:
        raise ConfigError(
            f"the openai translator's endpoint is not set: environment variable {spec.url_env} is empty",
            where=f"translator.url_env ({spec.url_env})",
            fix=f"export {spec.url_env}=https://host/v1 (an OpenAI-compatible server), or use a seq2seq translator",
        )
    check_url(url, spec.url_env)
    return url.rstrip("/")


def chat_content(body) -> str | None:
    """The first choice's message text of a chat-completions reply, or None when it has none."""
    try:
        content = body["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        return None
    return content if isinstance(content, str) else None


class OpenAITranslator:
    def __init__(self, spec: TranslatorSpec, backoff_s: float = 1.0):
        import httpx

        self.spec = spec
        self.label = spec.label
        self.url = endpoint_base(spec) + "/chat/completions"
        self.key = os.environ.get(spec.key_env) or None
        self.backoff_s = backoff_s
        # Plain http is loopback only: never through a proxy from the environment (it would carry the key in clear).
        self.client = httpx.Client(
            timeout=spec.timeout_s, follow_redirects=False, mounts={"http://": httpx.HTTPTransport()}
        )

    def check(self, src: str, tgt: str) -> None:
        """The endpoint is reached on the first request; its URL was checked when the translator was built."""

    def post(self, payload: dict) -> dict:
        """POST with the safety rules above; returns the parsed JSON body of a 200 reply."""
        import httpx

        body = json.dumps(payload).encode()
        last = ""
        for attempt in range(self.spec.max_retries + 1):
            url, hops = self.url, 0
            try:
                while True:
                    headers = {"Content-Type": "application/json"}
                    if self.key and origin(url) == origin(self.url):
                        headers["Authorization"] = f"Bearer {self.key}"
                    r = self.client.post(url, content=body, headers=headers)
                    if r.status_code in (307, 308) and "location" in r.headers and hops < MAX_REDIRECTS:
                        url = urljoin(url, r.headers["location"])
                        check_url(url, f"redirect from {self.url}")
                        hops += 1
                        continue
                    break
            except httpx.HTTPError as e:
                last = f"{type(e).__name__}: {e}"
            else:
                if r.status_code == 200:
                    try:
                        return r.json()
                    except (json.JSONDecodeError, UnicodeDecodeError):
                        raise ModelError(
                            f"the translation endpoint answered 200 with a body that is not JSON (content-type "
                            f"{r.headers.get('content-type')!r}, starts {r.text[:120]!r})",
                            where=url,
                            fix=f"check that {self.spec.url_env} points at the OpenAI-compatible API base (…/v1)",
                        ) from None
                last = f"HTTP {r.status_code}"
                if 300 <= r.status_code < 400:
                    last += (
                        f" redirect to {r.headers.get('location')!r} (only 307/308 are followed, {MAX_REDIRECTS} hops)"
                    )
                    break
                if r.status_code not in RETRY_STATUS:
                    last += f": {r.text[:200]}"
                    break
                retry_after = r.headers.get("retry-after", "")
                if retry_after.isdigit() and attempt < self.spec.max_retries:
                    time.sleep(min(float(retry_after), 30.0))
                    continue
            if attempt < self.spec.max_retries:
                time.sleep(min(self.backoff_s * 2**attempt, 30.0))
        raise ModelError(
            f"the translation endpoint failed: {last}",
            where=f"{self.url} ({self.spec.url_env})",
            fix=f"check the server and {self.spec.key_env}; shards written so far are kept and a re-run resumes",
        )

    def _one(self, args: tuple[str, str, str]) -> Translation:
        text, src, tgt = args
        payload = {
            "model": self.spec.endpoint_model,
            "messages": [{"role": "user", "content": llm_request(self.spec, text, src, tgt)}],
            "temperature": 0,
            "max_tokens": self.spec.max_new_tokens,
        }
        content = chat_content(self.post(payload))
        return Translation((content or "").strip())

    def translate(self, texts: list[str], src: str, tgt: str) -> list[Translation]:
        with ThreadPoolExecutor(max_workers=self.spec.concurrency) as pool:
            return list(pool.map(self._one, [(t, src, tgt) for t in texts]))
