"""The labelling page's HTTP server: the standard library's ThreadingHTTPServer, no dependency.

    GET  /              the page (page.html, shipped with the package)
    GET  /api/state     progress, the next item to answer, the buttons, the "done" message
    GET  /img/PATH      an image of the set (only files the set lists, only inside its folder)
    POST /api/answer    {"id": ..., "answer": ...}  -> the new state, or 400 {"error": ...}
    POST /api/undo      drop the last answer        -> the new state, or 400 {"error": ...}

POSTs must be `Content-Type: application/json` (a page of another site cannot send that
without the browser asking first, and this server never agrees); on a loopback address the
Host header must name it too (no DNS rebinding). One lock serialises the answers.
"""

from __future__ import annotations

import ipaddress
import json
import mimetypes
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from urllib.parse import unquote, urlsplit

from .sets import FeedbackSet, inside, open_set

MAX_BODY = 64 * 1024


class LabelServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, feedback: FeedbackSet, host: str = "127.0.0.1", port: int = 0):
        self.feedback, self.lock = feedback, threading.Lock()
        self.page = resources.files(__package__).joinpath("page.html").read_bytes()
        self.images = {p for it in feedback.items for p in it["images"] if p}
        super().__init__((host, port), Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{f'[{host}]' if ':' in host else host}:{port}/"


class Handler(BaseHTTPRequestHandler):
    server: LabelServer

    def log_message(self, *args):  # quiet: the terminal shows the URL, not every image request
        pass

    def do_GET(self):
        if not self._host_ok():
            return
        path = urlsplit(self.path).path
        if path == "/":
            return self._send(HTTPStatus.OK, self.server.page, "text/html; charset=utf-8")
        if path == "/api/state":
            with self.server.lock:
                return self._json(HTTPStatus.OK, self.server.feedback.state())
        if path.startswith("/img/"):
            return self._image(unquote(path[len("/img/"):]))
        self._json(HTTPStatus.NOT_FOUND, {"error": "not found"})

    def _image(self, rel: str):
        """A file the set lists, still inside the folder when it is read (symlinks resolved)."""
        real = inside(self.server.feedback.folder, rel) if rel in self.server.images else None
        if real is None:
            return self._json(HTTPStatus.NOT_FOUND, {"error": "not found"})
        kind = mimetypes.guess_type(real.name)[0] or "application/octet-stream"
        self._send(HTTPStatus.OK, real.read_bytes(), kind, cache="max-age=3600")

    def do_POST(self):
        if not self._host_ok():
            return
        path = urlsplit(self.path).path
        if path not in ("/api/answer", "/api/undo"):
            return self._json(HTTPStatus.NOT_FOUND, {"error": "not found"})
        try:
            body = self._body()
            with self.server.lock:
                fb = self.server.feedback
                if path == "/api/undo":
                    fb.undo()
                else:
                    if not isinstance(body, dict) or set(body) != {"id", "answer"}:
                        raise ValueError('the body must be a JSON object {"id": ..., "answer": ...}')
                    fb.answer(body["id"], body["answer"])
                state = fb.state()
        except ValueError as e:
            return self._json(HTTPStatus.BAD_REQUEST, {"error": str(e)})
        except OSError as e:  # the answer was not saved, so it is not counted
            return self._json(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": f"could not write in the folder: {e}"})
        self._json(HTTPStatus.OK, state)

    def _body(self):
        if self.headers.get_content_type() != "application/json":
            raise ValueError("send the body as Content-Type: application/json")
        try:
            n = int(self.headers.get("Content-Length", ""))
        except ValueError:
            raise ValueError("a Content-Length header is needed") from None
        if not 0 <= n <= MAX_BODY:
            raise ValueError(f"the body must be at most {MAX_BODY} bytes")
        try:
            return json.loads(self.rfile.read(n) or b"null")
        except (ValueError, UnicodeDecodeError) as e:
            raise ValueError(f"the body is not valid JSON ({e})") from None

    def _host_ok(self) -> bool:
        """On a loopback address, only requests addressed to it (a rebound DNS name is refused)."""
        host, port = self.server.server_address[:2]
        if not ipaddress.ip_address(host).is_loopback:
            return True
        names = {f"{name}:{port}" for name in (host, f"[{host}]", "localhost")}
        if self.headers.get("Host", "") in names:
            return True
        self._json(HTTPStatus.FORBIDDEN, {"error": f"Host must be one of {sorted(names)}"})
        return False

    def _json(self, status, data):
        self._send(status, json.dumps(data).encode(), "application/json")

    def _send(self, status, body: bytes, kind: str, cache: str = "no-store"):
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", cache)
        self.send_header("X-Content-Type-Options", "nosniff")
        self.end_headers()
        self.wfile.write(body)


def make_server(folder, host: str = "127.0.0.1", port: int = 0) -> LabelServer:
    """A server for the feedback set in `folder` (checked now: a bad folder fails before binding)."""
    feedback = open_set(Path(folder))
    try:
        return LabelServer(feedback, host, port)
    except OSError as e:
        raise ValueError(f"cannot listen on {host}:{port} ({e.strerror}): choose another --port "
                         "(0 picks a free one) or --host") from None
