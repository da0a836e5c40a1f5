"""pynetdicom set-up shared by the broker's SCP (broker.dimse) and SCU (broker.peers): an AE that
spools received C-STOREs to disk, and pynetdicom's logging of identifiers turned off.

Importing this module applies the process-wide pynetdicom settings below once.
"""

from __future__ import annotations

import contextlib
import logging
import struct
import tempfile
import threading
from collections.abc import Iterator
from typing import Any

from pydicom.filewriter import write_file_meta_info
from pynetdicom import (
    AE,
    PYNETDICOM_IMPLEMENTATION_UID,
    PYNETDICOM_IMPLEMENTATION_VERSION,
    _config,
    dimse_messages,
)
from pynetdicom.dsutils import create_file_meta

from broker.dicom.received import HashingWriter, Received


class SpoolingAE(AE):
    """An AE whose received C-STORE data sets go straight into a Part 10 temp file (file meta
    from the command set, then the raw bytes as sent, `event.dataset_path`): nothing is decoded
    or re-encoded and a multi-gigabyte instance never sits in memory. The files go to
    `spool_dir` (default: the system's temp dir, which may be RAM-backed: set it to disk)."""

    spool_dir: str | None = None
    # A spooled data set up to this size is also kept in memory, so the handler parses it
    # without reading the file back (one per association at a time).
    spool_keep_bytes: int = 1 << 20


def _spool_file(*args: Any, **kwargs: Any) -> Any:
    """pynetdicom opens the spool file with NamedTemporaryFile in the association's DUL thread:
    put it in the SpoolingAE's spool_dir, written through a `HashingWriter` (its SHA-256 is known
    when the last fragment arrives: `received_file(event)`)."""
    assoc = getattr(threading.current_thread(), "assoc", None)
    ae = getattr(assoc, "ae", None)
    spool_dir = getattr(ae, "spool_dir", None)
    if spool_dir is not None and "dir" not in kwargs:
        kwargs["dir"] = spool_dir
    raw = tempfile.NamedTemporaryFile(*args, **kwargs)  # noqa: SIM115 - pynetdicom closes it
    if not isinstance(ae, SpoolingAE):
        return raw
    return HashingWriter(raw, keep=ae.spool_keep_bytes)


def received_file(event: Any) -> Received | None:
    """The spooled data set of a C-STORE event with the hash computed while it was written, or
    None when it was not spooled through a `HashingWriter`."""
    spool = getattr(getattr(event, "request", None), "_dataset_file", None)
    if isinstance(spool, HashingWriter):
        return spool.received()  # at the spool file's own name: `event.dataset_path`
    return None


dimse_messages.NamedTemporaryFile = _spool_file


def only_standard_listeners(assoc: Any, events: Any) -> bool:
    """Whether nothing but the handler paired with each event in `events` ((event, handler or
    None), ...) listens on `assoc`: a path that skips pynetdicom's work for those events (the
    direct C-STORE-RSP, the C-STORE-RQ read in the DUL thread) skips nobody else's."""
    for event, standard in events:
        for handler in assoc.get_handlers(event):
            if handler[0] is not standard:
                return False
    return True


def uid_bytes(value: object) -> bytes | None:
    """A UID's value as written in a data set (ASCII, NUL-padded to an even length), or None
    when it cannot be written as it is (not ASCII, empty, over 64 characters: a valid UID's
    bounds): such a value is left to pydicom and pynetdicom, with their checks and refusals.
    For the bytes this process writes itself on the C-STORE path (spool File Meta, C-STORE-RSP)."""
    raw = str(value)
    if not raw.isascii() or not 0 < len(raw) <= 64:
        return None
    data = raw.encode("ascii")
    return data + b"\0" if len(data) % 2 else data


class _SpoolMeta:
    """The three values of a spool file's File Meta Information that vary (the rest is
    pynetdicom's implementation UID and version), as `uid_bytes`. pynetdicom builds a pydicom
    FileMetaDataset for every received C-STORE (each UID validated by regex on assignment) and
    writes it with pydicom: ~6% of a C-STORE's CPU in the serving process. `_write_spool_meta`
    writes the same bytes directly."""

    __slots__ = ("sop_class", "sop_instance", "syntax")

    def __init__(self, sop_class: bytes, sop_instance: bytes, syntax: bytes) -> None:
        self.sop_class = sop_class
        self.sop_instance = sop_instance
        self.syntax = syntax


def _explicit(tag: bytes, vr: bytes, value: bytes) -> bytes:
    return tag + vr + struct.pack("<H", len(value)) + value


_IMPLEMENTATION_UID = uid_bytes(PYNETDICOM_IMPLEMENTATION_UID)
assert _IMPLEMENTATION_UID is not None
_IMPLEMENTATION = _explicit(b"\x02\x00\x12\x00", b"UI", _IMPLEMENTATION_UID) + _explicit(
    b"\x02\x00\x13\x00",
    b"SH",
    PYNETDICOM_IMPLEMENTATION_VERSION.encode("ascii") + b" " * (len(PYNETDICOM_IMPLEMENTATION_VERSION) % 2),
)
_VERSION = b"\x02\x00\x01\x00OB\x00\x00\x02\x00\x00\x00\x00\x01"


def _spool_file_meta(
    *, sop_class_uid: Any, sop_instance_uid: Any, transfer_syntax: Any, **kwargs: Any
) -> Any:
    """pynetdicom's `create_file_meta` as dimse_messages calls it for a spool file: the values
    only, when they can be written as they are (`uid_bytes`); anything else goes through
    pydicom as before (its validation warnings, and its refusal of an empty value, which aborts
    the association)."""
    sop_class, sop_instance, syntax = (
        uid_bytes(v) for v in (sop_class_uid, sop_instance_uid, transfer_syntax)
    )
    if kwargs or sop_class is None or sop_instance is None or syntax is None:
        return create_file_meta(
            sop_class_uid=sop_class_uid,
            sop_instance_uid=sop_instance_uid,
            transfer_syntax=transfer_syntax,
            **kwargs,
        )
    return _SpoolMeta(sop_class, sop_instance, syntax)


def _write_spool_meta(fp: Any, file_meta: Any, enforce_standard: bool = True) -> None:
    """pydicom's `write_file_meta_info` for a `_SpoolMeta`: the same bytes (Explicit VR Little
    Endian, group length first, UIDs padded with NUL, the version name with a space)."""
    if not isinstance(file_meta, _SpoolMeta):
        write_file_meta_info(fp, file_meta, enforce_standard)
        return
    body = (
        _VERSION
        + _explicit(b"\x02\x00\x02\x00", b"UI", file_meta.sop_class)
        + _explicit(b"\x02\x00\x03\x00", b"UI", file_meta.sop_instance)
        + _explicit(b"\x02\x00\x10\x00", b"UI", file_meta.syntax)
        + _IMPLEMENTATION
    )
    fp.write(b"\x02\x00\x00\x00UL\x04\x00" + struct.pack("<I", len(body)) + body)


dimse_messages.create_file_meta = _spool_file_meta
dimse_messages.write_file_meta_info = _write_spool_meta


class _SpoolFor:
    """pynetdicom's STORE_RECV_CHUNKED_DATASET switch is process-wide, and other code in this
    process (e.g. a C-GET client reading `event.request.DataSet`) expects the default. pynetdicom
    reads the switch while decoding a C-STORE-RQ in the association's DUL thread, so this value
    is true only there, and only for associations of a SpoolingAE (or if someone had set it)."""

    def __init__(self, previous: object) -> None:
        self.previous = bool(previous) and not isinstance(previous, _SpoolFor)

    def __bool__(self) -> bool:
        if self.previous:
            return True
        assoc = getattr(threading.current_thread(), "assoc", None)
        return isinstance(getattr(assoc, "ae", None), SpoolingAE)


# No patient data in logs: pynetdicom logs every C-FIND/C-MOVE/C-GET identifier at INFO level
# by default (patient names, IDs, birth dates).
_config.LOG_REQUEST_IDENTIFIERS = False
_config.LOG_RESPONSE_IDENTIFIERS = False
_config.STORE_RECV_CHUNKED_DATASET = _SpoolFor(_config.STORE_RECV_CHUNKED_DATASET)  # type: ignore[assignment]


class _LogHandlersIfHeard:
    """pynetdicom's LOG_HANDLER_LEVEL: "standard" binds, to every association, handlers that
    describe each PDU and DIMSE message received or sent (at INFO and DEBUG) as it passes; they
    build those descriptions even when nothing would print them, ~2% of a C-STORE's CPU in the
    serving process (`--log-level warning`). pynetdicom compares the setting with "standard"
    as it sets up each association: this says so only while pynetdicom's logger would let
    INFO through (the default `--log-level info` does: its lines are unchanged)."""

    def __init__(self, previous: object) -> None:
        self.previous = previous

    def __eq__(self, other: object) -> bool:
        if other == "standard" and self.previous == "standard":
            return logging.getLogger("pynetdicom").isEnabledFor(logging.INFO)
        return self.previous == other

    def __hash__(self) -> int:
        return hash(self.previous)


_config.LOG_HANDLER_LEVEL = _LogHandlersIfHeard(_config.LOG_HANDLER_LEVEL)  # type: ignore[assignment]


class _SendChunked:
    """pynetdicom's STORE_SEND_CHUNKED_DATASET switch (send a Part 10 file's data set from disk
    as it is, without decoding it) is process-wide; it is read in the thread that calls
    send_c_store, so this value turns it on only inside `chunked_send()` (or if someone had set
    it): for C-MOVE/C-GET sub-operations here and the SCU's C-STOREs (broker.peers.dimse)."""

    def __init__(self, previous: object) -> None:
        self.previous = bool(previous) and not isinstance(previous, _SendChunked)
        self.local = threading.local()

    def __bool__(self) -> bool:
        return self.previous or bool(getattr(self.local, "on", False))


_SEND_CHUNKED = _SendChunked(_config.STORE_SEND_CHUNKED_DATASET)
_config.STORE_SEND_CHUNKED_DATASET = _SEND_CHUNKED  # type: ignore[assignment]


@contextlib.contextmanager
def chunked_send() -> Iterator[None]:
    """In this thread, `send_c_store(path)` sends the file's data set as stored."""
    _SEND_CHUNKED.local.on = True
    try:
        yield
    finally:
        _SEND_CHUNKED.local.on = False
