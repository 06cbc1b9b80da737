"""Streaming request bodies for frame uploads: size limit and multipart/form-data.

A frame upload is either the raw FITS bytes as the body or a
``multipart/form-data`` body with one file part. Both are consumed as a stream:
the byte limit is enforced while the body arrives (a too-large upload is
refused without reading the rest), and the file part of a multipart body is
passed on chunk by chunk, never held in memory whole. ``python-multipart`` is
not a dependency of the service, so the (small) multipart framing of RFC 7578
is parsed here.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator

from sitiancal.service.datasets import UnsupportedUpload, UploadTooLarge

#: Content types accepted for a raw FITS body.
RAW_TYPES = ("application/fits", "image/fits", "application/octet-stream")
#: Largest header block of one multipart part (bytes).
MAX_PART_HEADERS = 16 * 1024
#: Multipart framing allowed on top of the frame size limit (bytes).
MULTIPART_OVERHEAD = 64 * 1024


class MalformedUpload(ValueError):
    """The request body is not the multipart/form-data its header announces."""


async def limited(chunks: AsyncIterator[bytes], limit: int) -> AsyncIterator[bytes]:
    """Pass ``chunks`` on, raising :class:`UploadTooLarge` once more than ``limit`` bytes came."""
    total = 0
    async for chunk in chunks:
        total += len(chunk)
        if total > limit:
            raise UploadTooLarge(limit)
        if chunk:
            yield chunk


def _boundary(content_type: str) -> bytes:
    match = re.search(r'boundary="?([^";]+)"?', content_type, flags=re.IGNORECASE)
    if not match or not 1 <= len(match.group(1)) <= 70:
        raise MalformedUpload("multipart/form-data without a valid boundary parameter")
    return match.group(1).encode("latin-1")


def _disposition(headers: bytes) -> tuple[str | None, str | None]:
    """(field name, file name) of a part from its header block."""
    text = headers.decode("utf-8", "replace")
    for line in text.split("\r\n"):
        key, _, value = line.partition(":")
        if key.strip().lower() != "content-disposition":
            continue
        name = re.search(r'(?:^|;)\s*name="([^"]*)"', value)
        filename = re.search(r'(?:^|;)\s*filename="([^"]*)"', value)
        return (name.group(1) if name else None, filename.group(1) if filename else None)
    raise MalformedUpload("a multipart part has no Content-Disposition header")


class MultipartFile:
    """The one file part of a multipart/form-data body, read as a stream.

    Parameters
    ----------
    chunks : async iterator of bytes
        The request body.
    content_type : str
        The request's Content-Type (carries the boundary).
    """

    def __init__(self, chunks: AsyncIterator[bytes], content_type: str) -> None:
        self._chunks = chunks.__aiter__()
        boundary = _boundary(content_type)
        self._delimiter = b"\r\n--" + boundary
        self._buffer = b"\r\n"  # lets the first delimiter match like the others
        self._eof = False
        self.filename: str | None = None

    async def _fill(self) -> bool:
        if self._eof:
            return False
        try:
            self._buffer += await self._chunks.__anext__()
        except StopAsyncIteration:
            self._eof = True
            return False
        return True

    async def _skip_to_delimiter(self) -> bytes:
        """Consume through the next delimiter; return the two bytes after it."""
        while True:
            at = self._buffer.find(self._delimiter)
            if at >= 0 and len(self._buffer) >= at + len(self._delimiter) + 2:
                after = self._buffer[at + len(self._delimiter): at + len(self._delimiter) + 2]
                self._buffer = self._buffer[at + len(self._delimiter) + 2:]
                return after
            keep = len(self._delimiter) + 1
            if at < 0 and len(self._buffer) > keep:
                self._buffer = self._buffer[-keep:]
            if not await self._fill():
                raise MalformedUpload("the multipart body ends before its closing boundary")

    async def _headers(self) -> bytes:
        while (end := self._buffer.find(b"\r\n\r\n")) < 0:
            if len(self._buffer) > MAX_PART_HEADERS:
                raise MalformedUpload("a multipart part has a header block over 16 KiB")
            if not await self._fill():
                raise MalformedUpload("the multipart body ends inside a part's headers")
        headers, self._buffer = self._buffer[:end], self._buffer[end + 4:]
        return headers

    async def open(self) -> str | None:
        """Advance to the first part that carries a file; return its file name.

        Raises
        ------
        MalformedUpload
            The body is malformed or has no file part.
        """
        after = await self._skip_to_delimiter()
        while after == b"\r\n":
            name, filename = _disposition(await self._headers())
            if filename is not None or name in ("file", "frame"):
                self.filename = filename
                return filename
            after = await self._skip_to_delimiter()
        raise MalformedUpload("the multipart body has no file part (send the frame as a "
                              "part named 'file' with a filename)")

    async def content(self) -> AsyncIterator[bytes]:
        """The bytes of the file part found by :meth:`open`, chunk by chunk."""
        keep = len(self._delimiter) + 1
        while True:
            at = self._buffer.find(self._delimiter)
            if at >= 0:
                if at:
                    yield self._buffer[:at]
                self._buffer = self._buffer[at:]
                break
            if len(self._buffer) > keep:
                yield self._buffer[:-keep]
                self._buffer = self._buffer[-keep:]
            if not await self._fill():
                raise MalformedUpload("the multipart body ends inside the file part")
        after = await self._skip_to_delimiter()
        while after == b"\r\n":  # further parts: one frame per request
            _, filename = _disposition(await self._headers())
            if filename is not None:
                raise MalformedUpload("upload one frame per request (the body has several "
                                      "file parts)")
            after = await self._skip_to_delimiter()
        if after != b"--":
            raise MalformedUpload("malformed multipart boundary line")


def upload_kind(content_type: str | None) -> str:
    """``"raw"`` (FITS bytes as the body) or ``"multipart"`` from a Content-Type.

    Raises
    ------
    UnsupportedUpload
        A content type that is neither FITS bytes nor multipart/form-data.
    """
    media = (content_type or "").split(";")[0].strip().lower()
    if media == "multipart/form-data":
        return "multipart"
    if media in ("", *RAW_TYPES):
        return "raw"
    raise UnsupportedUpload(media)
