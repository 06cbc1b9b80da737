"""Serving immutable content: ETags, conditional requests and byte ranges.

Product versions never change once published, so every response carries a
strong ETag and ``Cache-Control: immutable``; ``If-None-Match`` answers
``304``; a single ``Range: bytes=...`` answers ``206`` with only those bytes
(RFC 9110). Several ranges in one request, or a malformed header, are
ignored and the whole content is sent (RFC 9110 allows this); a range that
starts beyond the end is a ``416``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import IO

from fastapi import Request, Response
from fastapi.responses import JSONResponse, StreamingResponse

from sitiancal.api.errors import RangeNotSatisfiable

#: Published versions never change: caches may keep them for a year.
IMMUTABLE = "public, max-age=31536000, immutable"
#: Bytes read from the store per streamed block.
BLOCK = 1024 * 1024


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """The ``(first, last)`` byte (inclusive) of a single-range header, or None for all.

    Raises
    ------
    RangeNotSatisfiable
        The range starts at or after the end of the content.
    """
    if not header:
        return None
    unit, _, spec = header.partition("=")
    spec = spec.strip()
    if unit.strip().lower() != "bytes" or not spec or "," in spec:
        return None
    first, dash, last = (p.strip() for p in spec.partition("-"))
    if not dash:
        return None
    try:
        if first == "":
            length = int(last)
            if length <= 0 or size == 0:
                raise RangeNotSatisfiable(header, size)
            return max(0, size - length), size - 1
        start = int(first)
        end = int(last) if last else max(start, size - 1)
    except ValueError:
        return None
    if start < 0 or end < start:
        return None
    if start >= size:
        raise RangeNotSatisfiable(header, size)
    return start, min(end, size - 1)


def etag_matches(if_none_match: str | None, etag: str) -> bool:
    """Whether an ``If-None-Match`` header matches ``etag`` (weak comparison)."""
    if not if_none_match:
        return False
    bare = etag.strip('"')
    for tag in if_none_match.split(","):
        tag = tag.strip()
        if tag == "*":
            return True
        if tag.startswith("W/"):
            tag = tag[2:]
        if tag.strip('"') == bare:
            return True
    return False


def _range_wanted(request: Request, etag: str) -> str | None:
    """The Range header, unless an If-Range names another version."""
    header = request.headers.get("range")
    if_range = request.headers.get("if-range")
    if header and if_range and if_range.strip() != etag:
        return None
    return header


def not_modified(etag: str, cache_control: str = IMMUTABLE) -> Response:
    """A ``304`` with the validators a cache needs."""
    return Response(status_code=304, headers={"ETag": etag, "Cache-Control": cache_control})


def bytes_response(request: Request, data: bytes, *, etag: str, media_type: str,
                   on_sent: Callable[[int], None] | None = None,
                   cache_control: str = IMMUTABLE) -> Response:
    """``200`` or ``206`` for content held in memory."""
    size = len(data)
    headers = {"ETag": etag, "Cache-Control": cache_control, "Accept-Ranges": "bytes"}
    span = parse_range(_range_wanted(request, etag), size)
    if span is None:
        body, status = data, 200
    else:
        body, status = data[span[0]:span[1] + 1], 206
        headers["Content-Range"] = f"bytes {span[0]}-{span[1]}/{size}"
    if on_sent is not None and request.method != "HEAD":
        on_sent(len(body))
    return Response(content=body, status_code=status, media_type=media_type, headers=headers)


def file_response(request: Request, opener: Callable[[], IO[bytes]], *, etag: str,
                  media_type: str, filename: str | None = None,
                  on_sent: Callable[[int], None] | None = None,
                  cache_control: str = IMMUTABLE) -> Response:
    """``200`` or ``206`` streamed from a (seekable) file of the store, block by block."""
    fobj = opener()
    try:
        fobj.seek(0, 2)
        size = fobj.tell()
        span = parse_range(_range_wanted(request, etag), size)
    except BaseException:
        fobj.close()
        raise
    start, end = span if span is not None else (0, size - 1)
    length = max(0, end - start + 1)
    headers = {"ETag": etag, "Cache-Control": cache_control, "Accept-Ranges": "bytes",
               "Content-Length": str(length)}
    if filename:
        headers["Content-Disposition"] = f'attachment; filename="{filename}"'
    if span is not None:
        headers["Content-Range"] = f"bytes {start}-{end}/{size}"
    if request.method == "HEAD":
        fobj.close()
        return Response(status_code=206 if span else 200, media_type=media_type,
                        headers=headers)

    def blocks() -> Iterator[bytes]:
        sent = 0
        try:
            fobj.seek(start)
            while sent < length:
                block = fobj.read(min(BLOCK, length - sent))
                if not block:
                    break
                sent += len(block)
                yield block
        finally:
            fobj.close()
            if on_sent is not None:
                on_sent(sent)

    return StreamingResponse(blocks(), status_code=206 if span else 200,
                             media_type=media_type, headers=headers)


def finite(obj: object) -> object:
    """``obj`` with every NaN or infinite float replaced by None (JSON has no NaN)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


class FiniteJSONResponse(JSONResponse):
    """JSON response that writes non-finite floats (NaN, inf in product stats) as null."""

    def render(self, content: object) -> bytes:
        return super().render(finite(content))
