"""The body of a request a stand-in's HTTP handler (http.server) received: by its
Content-Length, or de-chunked when it came with `Transfer-Encoding: chunked` (as
botocore, gcsfs and azure-core send uploads of unknown length), trailers skipped."""

from __future__ import annotations

from http.server import BaseHTTPRequestHandler


def read_body(handler: BaseHTTPRequestHandler) -> bytes:
    if "chunked" not in (handler.headers.get("Transfer-Encoding") or "").lower():
        return handler.rfile.read(int(handler.headers.get("Content-Length") or 0))
    parts = []
    while size := int(handler.rfile.readline().split(b";", 1)[0].strip() or b"0", 16):
        parts.append(handler.rfile.read(size))
        handler.rfile.readline()
    while handler.rfile.readline() not in (b"\r\n", b"\n", b""):
        pass  # trailers
    return b"".join(parts)
