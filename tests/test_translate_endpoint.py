"""The OpenAI-compatible translator against real local HTTP servers (127.0.0.1, threads, bounded requests)."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from raysafe.errors import ConfigError, ModelError
from raysafe.translate.config import TranslatorSpec
from raysafe.translate.endpoint import OpenAITranslator


class Server:
    """A loopback HTTP server answering POSTs from a script of (status, headers, body) replies; records requests."""

    def __init__(self, replies):
        self.replies = list(replies)
        self.requests: list[dict] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                n = int(self.headers.get("Content-Length", 0))
                body = json.loads(self.rfile.read(n) or b"{}")
                outer.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
                status, headers, payload = outer.replies.pop(0) if outer.replies else (500, {}, b"script exhausted")
                if callable(payload):
                    payload = payload(body)
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def echo_upper(body):
    text = body["messages"][0]["content"].rsplit("\n\n", 1)[-1]
    return json.dumps({"choices": [{"message": {"content": f" {text.upper()} "}}]}).encode()


OK = (200, {"Content-Type": "application/json"}, echo_upper)


@pytest.fixture()
def serve():
    servers = []

    def make(*replies):
        s = Server(replies)
        servers.append(s)
        return s

    yield make
    for s in servers:
        s.close()


def translator(monkeypatch, url, key="sk-test", **kw):
    monkeypatch.setenv("RAYSAFE_TRANSLATE_URL", url + "/v1")
    if key:
        monkeypatch.setenv("RAYSAFE_TRANSLATE_API_KEY", key)
    else:
        monkeypatch.delenv("RAYSAFE_TRANSLATE_API_KEY", raising=False)
    spec = TranslatorSpec(kind="openai", endpoint_model="mt-model", max_retries=2, concurrency=2, **kw)
    return OpenAITranslator(spec, backoff_s=0.01)


def test_translations_in_order_with_the_key_and_the_request_shape(serve, monkeypatch):
    s = serve(OK, OK, OK)
    out = translator(monkeypatch, s.url).translate(["one", "two", "three"], "en", "zh")
    assert [o.text for o in out] == ["ONE", "TWO", "THREE"]
    assert len(s.requests) == 3
    r = s.requests[0]
    assert r["path"] == "/v1/chat/completions" and r["auth"] == "Bearer sk-test"
    assert r["body"]["model"] == "mt-model" and r["body"]["temperature"] == 0
    assert "into Chinese (Simplified)" in r["body"]["messages"][0]["content"]


def test_retries_with_backoff_then_succeeds(serve, monkeypatch):
    s = serve((503, {}, b"busy"), (429, {"Retry-After": "0"}, b"slow down"), OK)
    assert translator(monkeypatch, s.url).translate(["hi"], "en", "ru")[0].text == "HI"
    assert len(s.requests) == 3


def test_gives_up_after_max_retries_naming_the_status(serve, monkeypatch):
    s = serve(*[(502, {}, b"bad gateway")] * 3)
    with pytest.raises(ModelError, match="HTTP 502") as e:
        translator(monkeypatch, s.url).translate(["hi"], "en", "ru")
    assert "RAYSAFE_TRANSLATE_URL" in e.value.where and "resumes" in e.value.fix
    assert len(s.requests) == 3  # 1 + max_retries


def test_client_error_is_not_retried(serve, monkeypatch):
    s = serve((401, {}, b"bad key"), OK)
    with pytest.raises(ModelError, match="HTTP 401: bad key"):
        translator(monkeypatch, s.url).translate(["hi"], "en", "ru")
    assert len(s.requests) == 1


def test_non_json_200_is_an_error_not_an_empty_translation(serve, monkeypatch):
    s = serve((200, {"Content-Type": "text/html"}, b"<html>login page</html>"))
    with pytest.raises(ModelError, match="not JSON.*text/html.*login page"):
        translator(monkeypatch, s.url).translate(["hi"], "en", "ru")


def test_reply_without_content_becomes_an_empty_translation(serve, monkeypatch):
    s = serve((200, {"Content-Type": "application/json"}, b'{"choices": []}'))
    assert translator(monkeypatch, s.url).translate(["hi"], "en", "ru")[0].text == ""


def test_key_kept_on_same_origin_redirect_and_dropped_across_origins(serve, monkeypatch):
    other = serve(OK)
    same = serve((307, {"Location": "/v2/chat/completions"}, b""), OK)
    assert translator(monkeypatch, same.url).translate(["a"], "en", "zh")[0].text == "A"
    assert [r["auth"] for r in same.requests] == ["Bearer sk-test", "Bearer sk-test"]
    assert same.requests[1]["path"] == "/v2/chat/completions"

    cross = serve((308, {"Location": other.url + "/v1/chat/completions"}, b""))
    assert translator(monkeypatch, cross.url).translate(["b"], "en", "zh")[0].text == "B"
    assert cross.requests[0]["auth"] == "Bearer sk-test"
    assert other.requests[0]["auth"] is None  # another port is another origin: no key there


def test_other_redirects_are_not_followed(serve, monkeypatch):
    s = serve((302, {"Location": "/elsewhere"}, b""))
    with pytest.raises(ModelError, match="redirect to '/elsewhere'.*only 307/308"):
        translator(monkeypatch, s.url).translate(["a"], "en", "zh")
    assert len(s.requests) == 1


def test_plain_http_off_loopback_and_credentials_in_url_are_refused(monkeypatch):
    monkeypatch.setenv("RAYSAFE_TRANSLATE_URL", "http://mt.example.com/v1")
    spec = TranslatorSpec(kind="openai", endpoint_model="m")
    with pytest.raises(ConfigError, match="plain http to 'mt.example.com'"):
        OpenAITranslator(spec)
    monkeypatch.setenv("RAYSAFE_TRANSLATE_URL", "https://user:pw@mt.example.com/v1")
    with pytest.raises(ConfigError, match="carries credentials"):
        OpenAITranslator(spec)
    monkeypatch.delenv("RAYSAFE_TRANSLATE_URL")
    with pytest.raises(ConfigError, match="RAYSAFE_TRANSLATE_URL is empty"):
        OpenAITranslator(spec)
    monkeypatch.setenv("RAYSAFE_TRANSLATE_URL", "https://mt.example.com/v1")
    assert OpenAITranslator(spec).url == "https://mt.example.com/v1/chat/completions"  # no request is made


def test_redirect_to_plain_http_elsewhere_is_refused(serve, monkeypatch):
    s = serve((307, {"Location": "http://mt.example.com/v1/chat/completions"}, b""))
    with pytest.raises(ConfigError, match="plain http to 'mt.example.com'"):
        translator(monkeypatch, s.url).translate(["a"], "en", "zh")
