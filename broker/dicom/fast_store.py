"""C-STORE requests received in the DUL thread, without pynetdicom's per-message path.

pynetdicom turns every P-DATA-TF PDU into PDU and primitive objects, decodes each command set
into a pydicom Dataset, builds a C_STORE primitive from it element by element and hands it to
the association thread, which wakes to run the Storage service class. Measured with a
do-nothing SCP (`bench/dimse.py`'s floor) that path alone is ~1.1 ms of CPU per small
instance on two cores, about half of what ScanOnce's SCP spends per C-STORE.

For an AE that opts in (`scanonce_fast_store`, the broker's SCP), the DUL thread reads each
P-DATA-TF PDU as bytes (PS3.8 9.3.5: PDV items of length, context ID, message control header,
fragment) and, when the PDU opens a C-STORE-RQ whose command set it fully understands, takes
the message over: the data set's fragments go straight into the same hashing spool file
pynetdicom would have written (`broker.dicom.network`), and when the last one arrives the
Storage service class runs in this thread, with a C_STORE primitive like pynetdicom's, through
the same EVT_C_STORE handlers and the same response. No thread hand-over: the peer waits for
that response before it sends its next request.

Everything else goes through pynetdicom as before: other messages, a command set split over
fragments or holding an element not listed here, a UID pynetdicom would warn about or refuse,
a context not accepted or whose abstract syntax is not the command's SOP class, TLS, a state
other than Sta6, an association whose DIMSE layer holds part of a message, listeners on the
received-PDU events (other than pynetdicom's standard ones, at most INFO heard), the requestor
side. A PDU that breaks the message's framing once it has been taken over (a command fragment,
another context, a fragment after the last) is a protocol error: the association is aborted
(A-ABORT, as pynetdicom does for a PDU it cannot decode) and the spool file removed. A spool
folder that cannot be written (a full disk) is answered with a status: the rest of the data set
is read and dropped and the request refused with 0xA700 (pynetdicom's own path aborts).
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import logging
import os
import secrets
import ssl
import struct
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path
from typing import Any

from pydicom.uid import UID
from pynetdicom import _config, evt
from pynetdicom._handlers import (
    standard_dimse_recv_handler,
    standard_pdu_recv_handler,
)
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.service_class import StorageServiceClass
from pynetdicom.sop_class import uid_to_service_class
from pynetdicom.transport import AssociationSocket

from broker.dicom.network import (
    _spool_file,
    _SpoolMeta,
    _write_spool_meta,
    only_standard_listeners,
    uid_bytes,
)
from broker.dicom.received import HashingWriter
from broker.dicom.uids import is_valid_uid

log = logging.getLogger("scanonce.dimse")
_PYNETDICOM_LOG = logging.getLogger("pynetdicom")

# Command elements (group 0000) of a C-STORE-RQ (PS3.7 9.3.1.1), by element number.
_GROUP_LENGTH = 0x0000
_SOP_CLASS = 0x0002
_COMMAND_FIELD = 0x0100
_MESSAGE_ID = 0x0110
_PRIORITY = 0x0700
_DATA_SET_TYPE = 0x0800
_SOP_INSTANCE = 0x1000
_MOVE_AE = 0x1030
_MOVE_MESSAGE_ID = 0x1031
_KNOWN = frozenset(
    (_GROUP_LENGTH, _SOP_CLASS, _COMMAND_FIELD, _MESSAGE_ID, _PRIORITY, _DATA_SET_TYPE, _SOP_INSTANCE)
    + (_MOVE_AE, _MOVE_MESSAGE_ID)
)
_US = frozenset((_COMMAND_FIELD, _MESSAGE_ID, _PRIORITY, _DATA_SET_TYPE, _MOVE_MESSAGE_ID))
_C_STORE_RQ = 0x0001
_OUT_OF_RESOURCES = 0xA700
_NO_DATA_SET = 0x0101

# Events whose listeners the fast path skips, and the one handler each may have: pynetdicom's
# standard handlers, which for a C-STORE-RQ and its P-DATA-TF PDUs say one line at INFO
# ("Received Store Request", said here too) and the rest at DEBUG (then the fast path is off).
_SKIPPED_EVENTS = (
    (evt.EVT_DATA_RECV, None),
    (evt.EVT_PDU_RECV, standard_pdu_recv_handler),
    (evt.EVT_DIMSE_RECV, standard_dimse_recv_handler),
)

_PDV = tuple[int, int, memoryview]  # context ID, message control header, fragment


def _pdvs(pdu: bytearray) -> list[_PDV] | None:
    """The PDV items of a whole P-DATA-TF PDU (header included), or None if they do not tile
    its body exactly or one is too short to hold its context ID and control header."""
    view = memoryview(pdu)
    items: list[_PDV] = []
    pos, end = 6, len(pdu)
    while pos < end:
        if end - pos < 6:
            return None
        (length,) = struct.unpack_from(">I", pdu, pos)
        if length < 2 or length > end - pos - 4:
            return None
        items.append((pdu[pos + 4], pdu[pos + 5], view[pos + 6 : pos + 4 + length]))
        pos += 4 + length
    return items or None


def _command(data: memoryview) -> dict[int, bytes] | None:
    """The elements of an Implicit VR Little Endian command set (PS3.7 6.3.1), or None if it
    holds anything but the C-STORE-RQ elements above, once each, in group 0000."""
    elements: dict[int, bytes] = {}
    pos, end = 0, len(data)
    while pos < end:
        if end - pos < 8:
            return None
        group, element, length = struct.unpack_from("<HHI", data, pos)
        pos += 8
        if group != 0 or element not in _KNOWN or element in elements or length > end - pos:
            return None
        value = bytes(data[pos : pos + length])
        if element in _US and length != 2:
            return None
        elements[element] = value
        pos += length
    return elements


def _us(value: bytes) -> int:
    return int(struct.unpack("<H", value)[0])


def _uid(value: bytes | None) -> UID | None:
    """A UI value as pydicom reads it (trailing NUL and spaces dropped), or None unless it is
    a valid UID (PS3.5 9.1, pydicom's own test), which pynetdicom takes without a word."""
    if value is None or not value.isascii():
        return None
    text = value.decode("ascii").rstrip("\0 ")
    return UID(text) if is_valid_uid(text) else None


def _is_storage(sop_class: str) -> bool:
    """pynetdicom serves this SOP class with its Storage service class (remembered: a handful
    of SOP classes arrive over and over)."""
    known = _STORAGE.get(sop_class)
    if known is None:
        known = _STORAGE.setdefault(sop_class, uid_to_service_class(sop_class) is StorageServiceClass)
    return known


_STORAGE: dict[str, bool] = {}


class _Request(C_STORE):
    """pynetdicom's C_STORE request primitive, whose `_dataset_path` (`event.dataset_path`) is
    made from the spool file's name when asked for: a pathlib.Path per instance was ~3% of a
    C-STORE's CPU, and the broker's handler reads the name from the spool file itself."""

    @property  # type: ignore[override]
    def _dataset_path(self) -> Path | None:
        spool = self._dataset_file
        return None if spool is None else Path(spool.name)

    @_dataset_path.setter
    def _dataset_path(self, value: Any) -> None:
        pass  # always the spool file's


class _Message:
    """A C-STORE-RQ taken over: its primitive, context and spool file, and why the spool file
    could not be written (then the rest of the data set is read and dropped, and the request
    refused with 0xA700 once it is whole: the peer gets a status, not a dropped association)."""

    __slots__ = ("context", "context_id", "failure", "request", "spool")

    def __init__(self, request: C_STORE, context: Any, context_id: int, spool: Any) -> None:
        self.request = request
        self.context = context
        self.context_id = context_id
        self.spool = spool
        self.failure: str | None = None

    def write(self, fragment: memoryview) -> None:
        if self.failure is None:
            try:
                self.spool.write(fragment)
            except OSError as exc:
                self.fail(exc)

    def fail(self, exc: OSError) -> None:
        # The errno's name only: a path or a message could carry more than the log should.
        self.failure = errno.errorcode.get(exc.errno or 0, "an I/O error")
        if self.spool is not None:
            _remove(self.spool)
            self.spool = None


class FastStore:
    """One association's C-STORE-RQ receiver in its DUL thread (see the module's doc)."""

    __slots__ = ("_message",)

    def __init__(self) -> None:
        self._message: _Message | None = None

    def take(self, dul: Any, pdu: bytearray) -> bool:
        """Handle a whole P-DATA-TF PDU (type 0x04, header included) read by `dul`: True when
        it was taken here, False to give it to pynetdicom as it is."""
        message = self._message
        items = _pdvs(pdu)
        if message is None:
            if items is None:
                return False
            message = self._open(dul, items)
            if message is None:
                return False
            self._message = message
            items = items[1:]
        elif items is None:
            self._abort(dul, "a malformed P-DATA-TF PDU")
            return True
        last = len(items) - 1
        for i, (context_id, header, fragment) in enumerate(items):
            if header & 1 or context_id != message.context_id or (header & 2 and i != last):
                self._abort(dul, "a PDV that does not continue the C-STORE-RQ's data set")
                return True
            message.write(fragment)
            if header & 2:
                self._message = None
                if message.failure is None:
                    try:
                        message.spool.flush()
                    except OSError as exc:
                        message.fail(exc)
                if message.failure is None:
                    self._serve(dul, message)
                else:
                    self._refuse(dul, message)
        return True

    def discard(self) -> None:
        """The association ended: a data set still being received was never acknowledged."""
        message, self._message = self._message, None
        if message is not None and message.spool is not None:
            _remove(message.spool)

    def _open(self, dul: Any, items: list[_PDV]) -> _Message | None:
        context_id, header, fragment = items[0]
        if header & 3 != 3:
            return None  # not a whole command set in one fragment
        # The rest of this PDU must be the data set's fragments, ending at most at its end.
        last = len(items) - 1
        for i, (cx, h, _) in enumerate(items[1:], start=1):
            if h & 1 or cx != context_id or (h & 2 and i != last):
                return None
        # Cheap tests first: most PDUs that are not a C-STORE-RQ end here.
        elements = _command(fragment)
        if elements is None:
            return None
        command = elements.get(_COMMAND_FIELD)
        data_set_type = elements.get(_DATA_SET_TYPE)
        if command is None or _us(command) != _C_STORE_RQ:
            return None
        if data_set_type is None or _us(data_set_type) == _NO_DATA_SET:
            return None
        if _MESSAGE_ID not in elements or _PRIORITY not in elements:
            return None
        assoc = dul.assoc
        sock = dul.socket
        if (
            not assoc.is_acceptor
            or not assoc.is_established
            or assoc._sent_release
            or dul.state_machine.current_state != "Sta6"
            or assoc.dimse.message is not None
            or not isinstance(sock, AssociationSocket)
            or isinstance(sock.socket, ssl.SSLSocket)
            or _PYNETDICOM_LOG.isEnabledFor(logging.DEBUG)
            or not only_standard_listeners(assoc, _SKIPPED_EVENTS)
        ):
            return None
        sop_class = _uid(elements.get(_SOP_CLASS))
        sop_instance = _uid(elements.get(_SOP_INSTANCE))
        context = assoc._accepted_cx.get(context_id)
        if sop_class is None or sop_instance is None or context is None:
            return None
        if context.abstract_syntax != sop_class or sop_class in assoc.acceptor.accepted_common_extended:
            return None
        if _config.UNRESTRICTED_STORAGE_SERVICE or not _is_storage(sop_class):
            return None
        priority = _us(elements[_PRIORITY])
        if priority not in (0, 1, 2):
            return None
        request = _Request()
        try:
            request.MessageID = _us(elements[_MESSAGE_ID])
            # Valid UIDs (`_uid`): what pynetdicom's setters would check again, by regex.
            request._affected_sop_class_uid = sop_class
            request._affected_sop_instance_uid = sop_instance
            request.Priority = priority
            if _MOVE_AE in elements:
                raw_ae = elements[_MOVE_AE]
                if not raw_ae.isascii():
                    return None
                request.MoveOriginatorApplicationEntityTitle = raw_ae.decode("ascii").strip(" \0")
            if _MOVE_MESSAGE_ID in elements:
                request.MoveOriginatorMessageID = _us(elements[_MOVE_MESSAGE_ID])
        except (ValueError, TypeError):
            return None
        meta = (uid_bytes(sop_class), uid_bytes(sop_instance), uid_bytes(context.transfer_syntax[0]))
        if None in meta:
            return None
        request.DataSet = BytesIO()
        request._context_id = context_id
        message = _Message(request, context, context_id, None)
        try:
            spool = message.spool = _new_spool(assoc.ae)
            spool.write(b"\0" * 128 + b"DICM")
            _write_spool_meta(spool, _SpoolMeta(*meta))  # type: ignore[arg-type]
        except OSError as exc:
            message.fail(exc)  # a full disk: refused with a status once the data set is read
        request._dataset_file = message.spool
        if _PYNETDICOM_LOG.isEnabledFor(logging.INFO) and assoc.get_handlers(evt.EVT_DIMSE_RECV):
            _PYNETDICOM_LOG.info("Received Store Request")
        return message

    def _serve(self, dul: Any, message: _Message) -> None:
        """pynetdicom's Association._serve_request for a C-STORE-RQ, in this thread: the
        Storage service class runs the EVT_C_STORE handlers, closes and removes the spool file
        and sends the response (the spool file is whole and flushed: `take`)."""
        assoc = dul.assoc
        assoc.dimse.cancel_req = {}
        try:
            StorageServiceClass(assoc).SCP(message.request, message.context)
        except Exception as exc:
            log.error("C-STORE service failed, aborting the association: %s", type(exc).__name__)
            _remove(message.spool)
            assoc.abort(block=False)  # blocking would wait for this very thread
        finally:
            assoc.dimse.cancel_req = {}
        _poke_if_queued(dul)

    def _refuse(self, dul: Any, message: _Message) -> None:
        """Answer 0xA700 (out of resources: the SCU may send it again later) to a C-STORE-RQ
        whose data set could not be written to the spool folder; nothing was stored."""
        log.warning(
            "C-STORE refused, the spool folder could not be written (%s): answered 0xA700",
            message.failure,
        )
        request = message.request
        rsp = C_STORE()
        rsp.MessageIDBeingRespondedTo = request.MessageID
        rsp._affected_sop_class_uid = request.AffectedSOPClassUID
        rsp._affected_sop_instance_uid = request.AffectedSOPInstanceUID
        rsp.Status = _OUT_OF_RESOURCES
        comment: Any = (
            "no space left to receive the data set"
            if message.failure == "ENOSPC"
            else "the data set could not be written on receipt"
        )
        rsp.ErrorComment = comment
        dul.assoc.dimse.send_msg(rsp, message.context_id)
        _poke_if_queued(dul)

    def _abort(self, dul: Any, what: str) -> None:
        log.warning(
            "DIMSE peer %s sent %s: association aborted",
            getattr(dul.assoc.requestor, "address", "?"),
            what,
        )
        self.discard()
        dul.event_queue.put("Evt19")  # invalid PDU: A-ABORT (PS3.8 9.2 AA-8)


# Spool file names unique to this process (its PID and a random token: the spool folder may be
# shared by receiver processes and other nodes), numbered, and created with O_EXCL all the same.
_spool_names: tuple[int, str, Iterator[int]] | None = None


def _spool_name(folder: str) -> str:
    global _spool_names
    names = _spool_names
    if names is None or names[0] != os.getpid():  # first use, or a forked child
        names = _spool_names = (
            os.getpid(),
            f"scanonce-{os.getpid()}-{secrets.token_hex(4)}-",
            itertools.count(),
        )
    return os.path.join(folder, f"{names[1]}{next(names[2])}.dcm")


def _new_spool(ae: Any) -> Any:
    """A new spool file written through a `HashingWriter`, as `network._spool_file` makes for
    pynetdicom, without the tempfile module's random names and wrapper (~3% of a C-STORE's
    CPU): a numbered name in the AE's spool folder, opened exclusively."""
    folder = getattr(ae, "spool_dir", None)
    if folder is None:
        return _spool_file(delete=False, mode="wb", suffix=".dcm")
    try:
        raw = open(_spool_name(folder), "xb")  # noqa: SIM115 - the Storage service class closes it
    except FileExistsError:
        return _spool_file(delete=False, mode="wb", suffix=".dcm")
    return HashingWriter(raw, keep=int(getattr(ae, "spool_keep_bytes", 0)))


def _poke_if_queued(dul: Any) -> None:
    if not dul.to_provider_queue.empty():
        # A response queued for this thread to send (not written directly): this thread does
        # not poke itself (`reactor`), so make its next wait return at once.
        pipe = getattr(dul, "_scanonce_pipe", None)
        if pipe is not None:
            pipe.poke()


def _remove(spool: Any) -> None:
    with contextlib.suppress(OSError, ValueError):
        spool.close()
    with contextlib.suppress(OSError):
        os.unlink(spool.name)


def end(dul: Any) -> None:
    """The DUL's association ended: what its receiver was still receiving was never
    acknowledged (`FastStore.discard`)."""
    fast = dul.__dict__.get("_scanonce_fast_store")
    if fast is not None:
        fast.discard()


def for_dul(dul: Any) -> FastStore | None:
    """The DUL's fast C-STORE receiver, made on first use, when its AE opts in."""
    fast = dul.__dict__.get("_scanonce_fast_store")
    if fast is None:
        if not getattr(dul.assoc.ae, "scanonce_fast_store", False):
            return None
        fast = dul.__dict__.setdefault("_scanonce_fast_store", FastStore())
    return fast
