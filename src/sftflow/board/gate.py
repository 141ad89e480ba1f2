"""The board's login: an ASGI gate in front of the whole gradio app.

gradio's own `auth` still serves the page's config and API description (every component with its default,
so the --config file's keys and the saves paths) inside the login page. The gate serves nothing of gradio
before login: a request without the session cookie gets this module's login form (GET) or 401, and a
websocket is closed. Posting the token to LOGIN_PATH sets the cookie, an HMAC of a per-process secret, so
a restarted board asks again.
"""

from __future__ import annotations

import hmac
import html
import secrets
from http.cookies import SimpleCookie
from typing import Any
from urllib.parse import parse_qs

LOGIN_PATH = "/sftflow-login"
COOKIE = "sftflow_board"
# gradio's launch() asks this of its own server before it returns; it answers a bool and starts the queue
OPEN_PATHS = frozenset({"/gradio_api/startup-events"})
MAX_FORM_BYTES = 4096

Send = Any
Receive = Any

LOGIN_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>sftflow board · login</title></head>
<body style="font-family: sans-serif; max-width: 24em; margin: 4em auto">
<h2>sftflow board</h2>{message}
<form method="post" action="{action}">
<label>token (SFTFLOW_BOARD_TOKEN) <input type="password" name="token" autofocus></label>
<button type="submit">log in</button>
</form></body></html>
"""


def login_page(message: str = "") -> bytes:
    note = f'<p style="color: #b00">{html.escape(message)}</p>' if message else ""
    return LOGIN_PAGE.format(message=note, action=LOGIN_PATH).encode()


class TokenGate:
    """ASGI middleware: `app` only for requests that carry the session cookie of a correct token."""

    def __init__(self, app: Any, token: str) -> None:
        self.app = app
        self.token = token.encode()
        self.session = hmac.new(secrets.token_bytes(32), b"sftflow-board", "sha256").hexdigest()

    def logged_in(self, scope: dict[str, Any]) -> bool:
        cookie = SimpleCookie()
        for name, value in scope.get("headers", []):
            if name == b"cookie":
                try:
                    cookie.load(value.decode("latin-1"))
                except Exception:  # a malformed Cookie header is a request without the cookie
                    continue
        sent = cookie.get(COOKIE)
        return sent is not None and hmac.compare_digest(sent.value.encode(), self.session.encode())

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket") or self.logged_in(scope):
            await self.app(scope, receive, send)
        elif scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
        elif scope["path"] in OPEN_PATHS and scope["method"] == "GET":
            await self.app(scope, receive, send)
        elif scope["path"] == LOGIN_PATH and scope["method"] == "POST":
            await self.login(receive, send)
        elif scope["method"] in ("GET", "HEAD"):
            await respond(send, 401, login_page(), "text/html; charset=utf-8")
        else:
            await respond(send, 401, b"not logged in\n", "text/plain")

    async def login(self, receive: Receive, send: Send) -> None:
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body") or len(body) > MAX_FORM_BYTES:
                break
        given = parse_qs(body[:MAX_FORM_BYTES].decode("utf-8", "replace")).get("token", [""])[0]
        if not hmac.compare_digest(given.encode(), self.token):
            await respond(send, 401, login_page("wrong token"), "text/html; charset=utf-8")
            return
        cookie = f"{COOKIE}={self.session}; Path=/; HttpOnly; SameSite=Strict"
        await respond(send, 303, b"", "text/plain", [(b"location", b"/"), (b"set-cookie", cookie.encode())])


async def respond(
    send: Send, status: int, body: bytes, content_type: str, headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    head = [(b"content-type", content_type.encode()), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": head + (headers or [])})
    await send({"type": "http.response.body", "body": body})
