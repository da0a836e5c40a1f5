"""Who may talk DIMSE to the broker, and what they may do: kept apart from the handlers.

- At association: a calling AE title is accepted only if a facility registered it and the peer
  calls from that AE title's network (`FacilityAE.network`; loopback when none); anyone else gets
  A-ASSOCIATE-RJ rejected-permanent, service-user, "calling AE title not recognised" (result 1,
  source 1, reason 3). Open mode (any AE title, as the default facility) only while the listener
  binds loopback (`open_mode_refusal`).
- Per operation: `guarded(operation, handler)` wraps a handler so that the caller's Principal
  (a facility node of its AE title's facility) is put to the one policy
  (`broker.security.service.authorize` -> `policy.permits`, the same answer as for HTTP) before
  the handler runs; a refusal is answered with 0x0124 "Refused: Not authorized" (PS3.7 C.4.1.x,
  a status every DIMSE service may return) and the handler never runs.
- The database away: the calling AE's registry lookup (at association or at an operation) and
  the handlers answer the operation's standard failure status with a comment that names nothing
  internal (`unavailable`), on an association that stays up; an association whose caller could
  not be looked up at negotiation is let in provisionally, and each operation looks again
  (0x0124 if the caller turns out not to be registered).
- TLS: the listener's SSL context (broker.security.tls), with the handshake done in the
  connection's own thread under the request timeout (`tls_handshake`), never in the accept loop.
"""

from __future__ import annotations

import contextlib
import logging
import ssl
import threading
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from pynetdicom import evt
from pynetdicom.dimse_primitives import C_GET, C_MOVE

from broker.dimse import audit as dimse_audit
from broker.dimse.service import OUT_OF_RESOURCES, UNABLE_TO_PERFORM_SUBOPERATIONS, status_dataset
from broker.errors import Forbidden, Unavailable
from broker.security.network import is_loopback_host
from broker.security.service import authorize
from broker.settings import Settings

if TYPE_CHECKING:
    from broker.dimse.scp import ScpHandle

log = logging.getLogger("scanonce.dimse")

NOT_AUTHORIZED = 0x0124
# What a peer reads while the database is away: nothing about hosts, drivers or SQL.
UNAVAILABLE_COMMENT = "the index is unavailable; try again later"


class AnsweredRetrieveFailure(Exception):  # noqa: N818 - a signal to pynetdicom, not an error of ours
    """Raised into pynetdicom by a C-MOVE or C-GET handler whose failure response is already
    arranged (`fail_retrieve`)."""


_answering = threading.local()


class _QuietAnsweredFailures(logging.Filter):
    """pynetdicom logs the exception `fail_retrieve` raises as a broken handler: an ERROR saying
    the handler "must yield the (address, port) of the destination AE", then the traceback. Each
    bad identifier from a peer would put both in the operator's log as a fault of ours, when the
    peer was answered as intended (and the handler logged its own line). Dropped on the thread
    that answered, up to and including the record of that exception."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not getattr(_answering, "on", False) or record.levelno < logging.ERROR:
            return True
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, AnsweredRetrieveFailure) or AnsweredRetrieveFailure.__name__ in str(record.msg):
            _answering.on = False
        return False


logging.getLogger("pynetdicom.service_class").addFilter(_QuietAnsweredFailures())


# The policy's action for each DIMSE operation (broker.security.policy.ACTIONS).
ACTIONS = {
    "C-ECHO": "dimse.echo",
    "C-STORE": "dimse.store",
    "C-FIND": "dimse.find",
    "C-MOVE": "dimse.move",
    "C-GET": "dimse.get",
}


def open_mode_refusal(settings: Settings, bind_host: str) -> str | None:
    """Why open mode may not serve on `bind_host` (None: it may, or it is off)."""
    if not settings.dimse_open_mode or is_loopback_host(bind_host):
        return None
    return (
        f"DIMSE open mode accepts any calling AE title, so it is for loopback only, and the DIMSE "
        f"listener would bind {bind_host or 'every interface'}: set SCANONCE_DIMSE_OPEN_MODE=false and "
        "register each facility's calling AE titles with the network they call from "
        "(scanonce facility update ID --calling-ae TITLE@CIDR), or bind 127.0.0.1."
    )


def refusal(event: evt.Event, operation: str) -> Any:
    """What a handler of `operation` returns to refuse it with 0x0124."""
    status = status_dataset(NOT_AUTHORIZED, "not authorized for this operation")
    if operation == "C-FIND":
        return iter([(status, None)])
    if operation == "C-GET":
        return fail_retrieve(event, NOT_AUTHORIZED, "not authorized for this operation")
    if operation == "C-MOVE":
        return _refuse_move(event)
    return status


def _refuse_move(event: evt.Event) -> Iterator[Any]:
    """pynetdicom sends a C-MOVE's final status only after it has associated with the move
    destination, and a refused caller must make the broker connect nowhere: the 0x0124
    response is sent here, then the association is aborted (pynetdicom then sends nothing)."""
    request = event.request
    rsp = C_MOVE()
    rsp.MessageIDBeingRespondedTo = request.MessageID
    rsp.AffectedSOPClassUID = request.AffectedSOPClassUID
    rsp.Status = NOT_AUTHORIZED
    rsp.ErrorComment = "not authorized for this operation"  # type: ignore[assignment]
    event.assoc.dimse.send_msg(rsp, event.context.context_id)
    event.assoc.abort()
    yield None, None  # not looked at: the association is no longer established


def unavailable(event: evt.Event, operation: str) -> Any:
    """What a handler of `operation` returns while the database is away: C-STORE 0xA700 (out of
    resources, PS3.4 B.2.3), C-FIND 0xA700 (C.4.1.1.4), C-MOVE and C-GET 0xA702 (out of
    resources, unable to perform sub-operations, C.4.2.1.5 / C.4.3.1.4): each a "try again
    later" for the peer. C-ECHO needs no database and succeeds (the node is there)."""
    if operation == "C-ECHO":
        return 0x0000
    if operation == "C-STORE":
        return status_dataset(OUT_OF_RESOURCES, "storage temporarily unavailable")
    if operation == "C-FIND":
        return iter([(status_dataset(OUT_OF_RESOURCES, UNAVAILABLE_COMMENT), None)])
    return fail_retrieve(event, UNABLE_TO_PERFORM_SUBOPERATIONS, UNAVAILABLE_COMMENT)


def fail_retrieve(event: evt.Event, status: int, comment: str) -> Iterator[Any]:
    """Answer a C-MOVE or C-GET with a failure decided before any sub-operation (the database
    away, a bad identifier, a refusal).

    pynetdicom sends a handler's final status only after one announced sub-operation: a C-GET
    answer then counted one failed sub-operation that never was, and a C-MOVE first associated
    with the destination (its first answer), for nothing, and was answered 0xA801 instead when
    the destination is down. So the handler raises instead, and pynetdicom answers the request
    with its own status for a failing handler (0xC514 / 0xC413, no comment, no counts); that
    one response gets `status` and `comment` on its way out. The association stays up (unlike
    `_refuse_move`, which must also stop the sub-association)."""
    dimse = event.assoc.dimse
    message_id = event.request.MessageID
    response_type = C_GET if isinstance(event.request, C_GET) else C_MOVE
    patched = "send_msg" in vars(dimse)
    original = dimse.send_msg

    def send_msg(primitive: Any, context_id: int) -> None:
        if isinstance(primitive, response_type) and primitive.MessageIDBeingRespondedTo == message_id:
            if patched:
                dimse.send_msg = original  # type: ignore[method-assign]
            else:
                del dimse.send_msg  # this response only
            primitive.Status = status
            primitive.ErrorComment = comment  # type: ignore[assignment]
        original(primitive, context_id)

    dimse.send_msg = send_msg  # type: ignore[method-assign]
    _answering.on = True
    # pynetdicom logs this exception: its message must not carry the comment, which can quote
    # the identifier's values.
    raise AnsweredRetrieveFailure(f"answered 0x{status:04X}")
    yield  # a generator, as pynetdicom expects of a C-MOVE / C-GET handler


def guarded(operation: str, handler: Callable[..., Any]) -> Callable[..., Any]:
    """`handler` behind the policy: the caller's Principal must be permitted `operation`."""
    action = ACTIONS[operation]

    def guard(event: evt.Event, handle: ScpHandle, *args: Any) -> Any:
        try:
            principal, facility = handle.caller(event)
        except Unavailable:
            log.error("DIMSE %s answered 'unavailable': the caller's registry lookup failed", operation)
            return unavailable(event, operation)
        if facility is None and operation != "C-STORE":
            # Let in while the registry could not be read (`admit`), and not registered after all.
            return refusal(event, operation)
        try:
            # C-STORE writes into the caller's facility's partition; the others read the index.
            authorize(principal, action=action, facility=facility if operation == "C-STORE" else None)
        except Forbidden:
            log.warning("DIMSE %s refused for %s", operation, principal.who)
            # A refused access is audited too (best effort: it is refused either way).
            with contextlib.suppress(Unavailable):
                dimse_audit.record(handle.state, event, principal, operation, refused=True)
            return refusal(event, operation)
        return handler(event, handle, *args)

    guard.__name__ = getattr(handler, "__name__", "guard")
    guard.__doc__ = handler.__doc__
    return guard


def tls_handshake(sock: Any, timeout: float) -> bool:
    """Complete a server-side TLS handshake within `timeout` seconds (False: refused or failed,
    e.g. a peer without a valid client certificate; the caller closes the connection)."""
    if not isinstance(sock, ssl.SSLSocket):
        return True
    previous = sock.gettimeout()
    try:
        sock.settimeout(timeout)
        sock.do_handshake()
    except (ssl.SSLError, OSError) as exc:
        log.warning("DIMSE TLS handshake refused: %s", type(exc).__name__)
        return False
    finally:
        with contextlib.suppress(OSError):
            sock.settimeout(previous)
    return True
