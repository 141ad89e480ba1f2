"""The board behind SFTFLOW_BOARD_TOKEN serves nothing but its login form before login: no page config,
no API description, no --config values or saves paths (#28 finding 6)."""

from __future__ import annotations

import socket
import urllib.error
import urllib.request

import pytest
import yaml

pytest.importorskip("gradio")

from sftflow.board import app, gate, views  # noqa: E402
from sftflow.errors import SftflowError  # noqa: E402

SECRET_HUB = "hf_boardSecretDoNotLeak"
PATHS = ["/", "/config", "/gradio_api/info", "/gradio_api/info?all_endpoints=true", "/gradio_api/openapi.json",
         "/openapi.json", "/docs", "/gradio_api/queue/status", "/theme.css", "/login", "/x/../config"]  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fetch(url: str, data: bytes | None = None, cookie: str | None = None) -> tuple[int, str, dict]:
    req = urllib.request.Request(url, data=data, headers={"Cookie": cookie} if cookie else {})
    opener = urllib.request.build_opener(NoRedirect)
    try:
        with opener.open(req, timeout=30) as resp:
            return resp.status, resp.read().decode(errors="replace"), dict(resp.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace"), dict(exc.headers)


class NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None


def test_token_is_required_off_loopback():
    assert views.board_token("127.0.0.1", {}) is None and views.board_token("::1", {}) is None
    with pytest.raises(SftflowError, match="SFTFLOW_BOARD_TOKEN"):
        views.board_token("0.0.0.0", {})
    assert views.board_token("0.0.0.0", {"SFTFLOW_BOARD_TOKEN": "s3cret"}) == "s3cret"


@pytest.mark.integration
def test_nothing_but_the_login_form_before_login(tmp_path, monkeypatch, tiny_model_dir):
    saves = tmp_path / "saves_dir_marker"
    config = tmp_path / "cfg.yaml"
    config.write_text(yaml.safe_dump({"model_name_or_path": str(tiny_model_dir), "hub_token": SECRET_HUB,
                                      "dataset_dir": str(tmp_path / "data_dir_marker"), "do_train": True}))  # fmt: skip
    monkeypatch.setenv("SFTFLOW_BOARD_TOKEN", "tok-123")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    demo = app.serve("127.0.0.1", port, saves, config, block=False)
    try:
        for path in PATHS:
            status, body, _ = fetch(base + path)
            assert status in (401, 404), (path, status)
            for leak in (
                SECRET_HUB,
                "saves_dir_marker",
                "data_dir_marker",
                str(tmp_path),
                "key-",
                "components",
            ):
                assert leak not in body, (path, leak)
        status, body, _ = fetch(base + "/")
        assert 'name="token"' in body and gate.LOGIN_PATH in body
        status, body, _ = fetch(base + gate.LOGIN_PATH, data=b"token=guess")
        assert status == 401 and "wrong token" in body
        status, _, headers = fetch(base + gate.LOGIN_PATH, data=b"token=tok-123")
        assert status == 303
        cookie = headers["set-cookie"].split(";")[0]
        assert "HttpOnly" in headers["set-cookie"]
        status, body, _ = fetch(base + "/", cookie=cookie)
        assert status == 200 and "saves_dir_marker" in body  # after login: the page itself
        status, _, _ = fetch(base + "/config", cookie=cookie + "x")
        assert status == 401
    finally:
        demo.close()
