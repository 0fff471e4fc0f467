"""A local stand-in for the Hugging Face hub that can cut a download off half-way (loopback only)."""
from __future__ import annotations

import hashlib
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class FakeHub:
    """Serves ``files`` as ``/{repo}/resolve/main/{name}``; the first ``cuts`` GETs of ``cut_file`` stop half-way."""

    def __init__(self, repo: str, folder: Path, cut_file: str | None = None, cuts: int = 0) -> None:
        self.repo, self.cut_file, self.cuts = repo, cut_file, cuts
        self.files = {p.name: p.read_bytes() for p in folder.iterdir()}
        self.requests: list[str] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _file(self):
                prefix = f"/{hub.repo}/resolve/main/"
                name = self.path.split("?")[0][len(prefix):] if self.path.startswith(prefix) else None
                return name, hub.files.get(name)

            def _head(self, name, data, status=200, length=None):
                self.send_response(status)
                self.send_header("X-Repo-Commit", COMMIT)
                self.send_header("ETag", '"' + hashlib.sha256(data).hexdigest() + '"')
                self.send_header("Content-Length", str(len(data) if length is None else length))
                self.end_headers()

            def _missing(self):
                self.send_response(404)
                self.send_header("X-Error-Code", "EntryNotFound")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def do_HEAD(self):
                name, data = self._file()
                hub.requests.append(f"HEAD {name}")
                self._missing() if data is None else self._head(name, data)

            def do_GET(self):
                name, data = self._file()
                hub.requests.append(f"GET {name} {self.headers.get('Range', '')}")
                if data is None:
                    return self._missing()
                start = int(self.headers["Range"].split("=")[1].split("-")[0]) if self.headers.get("Range") else 0
                body = data[start:]
                if start:
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                    self.send_header("Content-Length", str(len(body)))
                    self.send_header("ETag", '"' + hashlib.sha256(data).hexdigest() + '"')
                    self.end_headers()
                else:
                    self._head(name, data)
                if name == hub.cut_file and hub.cuts > 0:
                    hub.cuts -= 1
                    self.wfile.write(body[:len(body) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
