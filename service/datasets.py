"""Dataset registration: input-root checks, header scans and frame uploads.

A dataset is registered either from a ``source`` (a folder or URL prefix that
must lie inside one of the configured input roots) or empty (``source=None``)
and then filled by uploads, one FITS frame per request. In both cases the
frames go through the same header scan (:func:`sitiancal.storage.scan.scan`)
and the inventory is stored in the catalog.

Path checks happen on resolved paths: ``..`` segments and symbolic links are
resolved before the source is compared with the (resolved) input roots, and
every symbolic link inside a source folder must also resolve inside the roots,
so that neither a crafted path nor a link planted in a data folder can make
the service read files elsewhere.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import re
import threading
import uuid
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sitiancal.service.settings import Settings
from sitiancal.storage.catalog import Catalog, Dataset
from sitiancal.storage.scan import FrameType, Inventory, Rejection, scan

#: Product types a dataset can support, in pipeline order (API.md).
ALL_PRODUCTS = ("bias", "read_noise", "dark", "ptc", "gain", "linearity", "flat", "mask")
#: Bias frames needed for a master bias and a temporal read-noise map.
MIN_BIAS_FRAMES = 2
#: Distinct flat exposure levels needed for a photon-transfer or gain fit
#: (a straight line through mean/variance pairs needs two points).
MIN_FLAT_LEVELS = 2
#: Distinct flat exposure levels needed for a linearity fit with residuals.
MIN_LINEARITY_LEVELS = 3


class PathNotAllowed(PermissionError):
    """A source outside the input roots, after resolving ``..`` and links (HTTP 403)."""

    def __init__(self, source: str, reason: str) -> None:
        super().__init__(source, reason)
        self.source = source
        self.reason = reason

    def __str__(self) -> str:
        return f"source {self.source!r} is not allowed: {self.reason}"


class InvalidSource(ValueError):
    """A source that is malformed or does not exist (HTTP 422)."""

    def __init__(self, source: str, reason: str) -> None:
        super().__init__(source, reason)
        self.source = source
        self.reason = reason

    def __str__(self) -> str:
        return f"source {self.source!r}: {self.reason}"


class NoUsableFrames(ValueError):
    """A scan that accepted no frame; carries every reason (HTTP 422)."""

    def __init__(self, source: str, reasons: Sequence[str]) -> None:
        super().__init__(source, tuple(reasons))
        self.source = source
        self.reasons = tuple(reasons)

    def __str__(self) -> str:
        listed = "; ".join(self.reasons) if self.reasons else "no FITS file found"
        return f"no usable frame in {self.source}: {listed}"


class FrameRejected(ValueError):
    """An uploaded frame that the scan rejects (HTTP 422)."""

    def __init__(self, filename: str, reason: str) -> None:
        super().__init__(filename, reason)
        self.filename = filename
        self.reason = reason

    def __str__(self) -> str:
        return f"frame {self.filename!r} rejected: {self.reason}"


class UploadTooLarge(ValueError):
    """An upload beyond the size limit (HTTP 413)."""

    def __init__(self, limit: int) -> None:
        super().__init__(limit)
        self.limit = limit

    def __str__(self) -> str:
        return f"upload larger than the limit of {self.limit} bytes"


class UnsupportedUpload(ValueError):
    """An upload body of a content type that is not FITS bytes or multipart (HTTP 415)."""

    def __init__(self, media_type: str) -> None:
        super().__init__(media_type)
        self.media_type = media_type

    def __str__(self) -> str:
        return (f"unsupported content type {self.media_type!r}: send the FITS bytes as "
                "application/fits (or application/octet-stream) or as multipart/form-data")


class UploadNotAllowed(ValueError):
    """Uploading into a dataset that was registered from a source (HTTP 409)."""

    def __init__(self, dataset_id: str, source: str) -> None:
        super().__init__(dataset_id, source)
        self.dataset_id = dataset_id
        self.source = source

    def __str__(self) -> str:
        return (f"dataset {self.dataset_id} was registered from {self.source!r}; frames can "
                "only be uploaded into a dataset created with \"source\": null")


# -- input roots ---------------------------------------------------------------
def _is_url(text: str) -> bool:
    return re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", text) is not None


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def _check_url(source: str, roots: Sequence[str]) -> str:
    scheme, _, rest = source.partition("://")
    segments = rest.split("/")
    if any(seg in (".", "..") for seg in segments) or "//" in rest.rstrip("/"):
        raise PathNotAllowed(source, "'.', '..' and empty segments are not allowed in URLs")
    if any(ord(ch) < 32 for ch in source):
        raise InvalidSource(source, "control characters are not allowed")
    normalized = f"{scheme.lower()}://{rest.rstrip('/')}"
    for root in roots:
        if not _is_url(root):
            continue
        r_scheme, _, r_rest = root.partition("://")
        base = f"{r_scheme.lower()}://{posixpath.normpath(r_rest).rstrip('/')}"
        if normalized == base or normalized.startswith(base + "/"):
            return normalized
    raise PathNotAllowed(source, "it is not under any input root URL prefix")


def _local_roots(roots: Sequence[str]) -> list[str]:
    return [os.path.realpath(r) for r in roots if not _is_url(r)]


def check_source(source: str, roots: Sequence[str]) -> str:
    """Resolve ``source`` and check that it lies inside the input roots.

    Parameters
    ----------
    source : str
        An absolute local path (folder or file) or a URL prefix (``s3://...``).
    roots : sequence of str
        The configured input roots (``Settings.input_roots``).

    Returns
    -------
    str
        The resolved source: the real path of a local source (links and
        ``..`` resolved), or the normalized URL.

    Raises
    ------
    PathNotAllowed
        No input roots, or the resolved source (or a link inside it) lies
        outside them.
    InvalidSource
        A relative path, a NUL character, or a path that does not exist.
    """
    if "\x00" in source:
        raise InvalidSource(source, "NUL characters are not allowed")
    if not roots:
        raise PathNotAllowed(source, "no input roots are configured (SITIANCAL_INPUT_ROOTS)")
    if _is_url(source) and not source.lower().startswith("file://"):
        return _check_url(source, roots)
    path = source[len("file://"):] if source.lower().startswith("file://") else source
    if not os.path.isabs(path):
        raise InvalidSource(source, "give an absolute path or a URL")
    local = _local_roots(roots)
    real = os.path.realpath(path)
    if not any(_inside(real, root) for root in local):
        shown = f" resolves to {real!r}, which" if real != path.rstrip(os.sep) else ""
        raise PathNotAllowed(source, f"it{shown} is outside the input roots "
                             f"({', '.join(local) or 'none are local folders'})")
    if not os.path.exists(real):
        raise InvalidSource(source, "no such file or folder")
    if os.path.isdir(real):
        for link, target in _links(real):
            if not any(_inside(target, root) for root in local):
                raise PathNotAllowed(source, f"the symbolic link {link!r} inside it points to "
                                     f"{target!r}, outside the input roots")
    return real


def _links(folder: str) -> Iterable[tuple[str, str]]:
    """``(link, resolved target)`` of every symbolic link under ``folder`` (not followed)."""
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=False):
        for name in (*dirnames, *filenames):
            full = os.path.join(dirpath, name)
            if os.path.islink(full):
                yield full, os.path.realpath(full)


# -- what a dataset supports ------------------------------------------------------
def supported_products(inventory: dict[str, Any]) -> list[str]:
    """Product types the frames of an inventory can support.

    The rule reads the counts and exposure times of the inventory: bias and
    read noise need at least two bias frames; dark needs dark frames at two
    exposure times (or one non-zero time plus bias frames); ptc and gain need
    flats at two exposure levels, linearity at three; flat needs a flat frame;
    mask needs any of these. The pipeline still reports a requested product it
    cannot build with its reason.
    """
    counts = inventory.get("counts") or {}
    times = inventory.get("exposure_times") or {}
    n_bias = int(counts.get(FrameType.BIAS.value, 0))
    dark_times = [float(t) for t in times.get(FrameType.DARK.value, [])]
    flat_times = [float(t) for t in times.get(FrameType.FLAT.value, [])]
    out = []
    if n_bias >= MIN_BIAS_FRAMES:
        out += ["bias", "read_noise"]
    if len(dark_times) >= 2 or (n_bias and any(t > 0 for t in dark_times)):
        out.append("dark")
    if len(flat_times) >= MIN_FLAT_LEVELS:
        out += ["ptc", "gain"]
    if len(flat_times) >= MIN_LINEARITY_LEVELS:
        out.append("linearity")
    if flat_times:
        out.append("flat")
    if out:
        out.append("mask")
    return [p for p in ALL_PRODUCTS if p in out]


def _reasons(inventory: Inventory) -> list[str]:
    return [f"{r.file}: {r.reason}" for r in inventory.rejected] + list(inventory.warnings)


def _safe_name(filename: str | None) -> str:
    base = (filename or "").replace("\\", "/").rsplit("/", 1)[-1]
    base = re.sub(r"[^A-Za-z0-9._-]+", "_", base).strip("._") or "frame"
    if not re.search(r"\.(fits|fit|fts)(\.gz)?$|\.fz$", base, flags=re.IGNORECASE):
        base += ".fits"
    return base[-100:]


@dataclass(frozen=True)
class ReceivedFile:
    """An upload written to disk: path, size (bytes) and sha256."""

    path: Path
    size: int
    sha256: str


class DatasetRegistry:
    """Registers datasets and receives uploaded frames.

    Parameters
    ----------
    catalog : Catalog
        Where datasets are recorded.
    settings : Settings
        Input roots, upload limit and the data dir (uploads go to
        ``<data_dir>/uploads/<dataset id>/``).
    """

    def __init__(self, catalog: Catalog, settings: Settings) -> None:
        self.catalog = catalog
        self.settings = settings
        self.upload_root = Path(settings.data_dir).resolve() / "uploads"
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()

    def register(self, camera: str, source: str | None, label: str | None = None, *,
                 actor: str = "system", allow_mixed_states: bool = False,
                 types_from_paths: bool = False) -> Dataset:
        """Scan ``source`` (or create an empty dataset for uploads) and record it.

        ``allow_mixed_states`` and ``types_from_paths`` are passed to
        :func:`sitiancal.storage.scan.scan`.

        Raises
        ------
        PathNotAllowed, InvalidSource
            See :func:`check_source`.
        NoUsableFrames
            The scan accepted no frame; the error lists every reason.
        """
        if source is None:
            empty = Inventory(source="", shape=None, counts={t.value: 0 for t in FrameType},
                              exposure_times={t.value: [] for t in FrameType},
                              temperature={"min": None, "max": None}, operating_state={},
                              frames=[], rejected=[], warnings=[])
            inventory = {**empty.model_dump(mode="json"), "source": None}
            dataset_id = self.catalog.add_dataset(camera, inventory, [], source=None,
                                                  label=label, actor=actor)
            return self.catalog.get_dataset(dataset_id)
        resolved = check_source(source, self.settings.input_roots)
        inventory = scan(resolved, allow_mixed_states=allow_mixed_states,
                         types_from_paths=types_from_paths)
        if not inventory.frames:
            raise NoUsableFrames(resolved, _reasons(inventory))
        dataset_id = self.catalog.add_dataset(camera, inventory, source=resolved, label=label,
                                              actor=actor)
        return self.catalog.get_dataset(dataset_id)

    def _lock(self, dataset_id: str) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(dataset_id, threading.Lock())

    def upload_target(self, dataset_id: str) -> Dataset:
        """The dataset an upload goes to; refuses datasets registered from a source."""
        dataset = self.catalog.get_dataset(dataset_id)
        if dataset.source is not None:
            raise UploadNotAllowed(dataset_id, dataset.source)
        return dataset

    async def receive(self, dataset_id: str, filename: str | None,
                      chunks: AsyncIterator[bytes], *, limit: int) -> ReceivedFile:
        """Write an upload stream to the dataset's upload folder, hashing it on the way.

        The size limit is enforced while the bytes arrive; a partial file is
        removed on any error.

        Raises
        ------
        UploadTooLarge
            More than ``limit`` bytes arrived.
        """
        folder = self.upload_root / dataset_id
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".incoming-{uuid.uuid4().hex}"
        digest = hashlib.sha256()
        size = 0
        try:
            with open(tmp, "wb") as out:
                async for chunk in chunks:
                    size += len(chunk)
                    if size > limit:
                        raise UploadTooLarge(limit)
                    digest.update(chunk)
                    out.write(chunk)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        final = folder / f"{uuid.uuid4().hex[:8]}-{_safe_name(filename)}"
        os.replace(tmp, final)
        return ReceivedFile(final, size, digest.hexdigest())

    def add_uploaded(self, dataset_id: str, received: ReceivedFile, *,
                     display_name: str | None = None, actor: str = "system") -> Dataset:
        """Scan the dataset's uploads with the new frame; keep it only if accepted.

        The whole upload folder is scanned again so that the set checks (same
        shape, same operating state) apply to the new frame as to a folder.

        Raises
        ------
        FrameRejected
            The new frame is rejected; it is removed and the dataset is unchanged.
        """
        name = display_name or received.path.name
        with self._lock(dataset_id):
            before = self.upload_target(dataset_id)
            folder = str(received.path.parent)
            inventory = scan(folder)
            path = str(received.path)
            # frames the dataset rejected once their pixels were read (a job's
            # cube left them out: Catalog.leave_out_frames) stay rejected
            earlier = {r["file"]: r for r in before.inventory.get("rejected") or ()}
            kept_out = [Rejection.model_validate(earlier[f.path]) for f in inventory.frames
                        if f.path in earlier and f.path != path]
            if kept_out:
                inventory = inventory.leave_out(kept_out)
            accepted = [f for f in inventory.frames if f.path == path]
            if not accepted:
                reason = next((r.reason for r in inventory.rejected if r.file == path),
                              "not recognised as a FITS frame")
                received.path.unlink(missing_ok=True)
                raise FrameRejected(name, reason)
            frame = accepted[0]
            self.catalog.add_frames(dataset_id, [{
                "path": path, "sha256": received.sha256, "type": frame.type.value,
                "exptime": frame.exptime, "time": frame.time}],
                inventory=inventory, actor=actor)
            return self.catalog.get_dataset(dataset_id)
