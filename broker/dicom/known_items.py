"""The presentation contexts of an association's negotiation, decoded and encoded once.

A modality or PACS proposes the same presentation contexts on every association it opens
(dcmtk's `storescu` ~120: each a context ID, an abstract syntax and its transfer syntaxes), and
many open one association per study, some one per instance. pynetdicom decodes each context
item into objects, sub-item by sub-item, every time: measured with py-spy over associations of
one C-STORE each from `storescu`, that decoding was ~17% of the serving process's CPU per
association (~3-4 ms of ~20), more than the C-STORE itself.

Answering, pynetdicom builds an A-ASSOCIATE-AC item for each context (a sub-item, a UID set
and checked) and encodes it field by field: another ~10% of that CPU, for answers that repeat
as the proposals do.

`install()` makes A-ASSOCIATE-RQ decoding take a Presentation Context item whose bytes were
seen before from a table instead of decoding it again, and an A-ASSOCIATE-AC's Presentation
Context item for a (context ID, result, transfer syntax) answered before take that answer's
fields and bytes. A decoded item is the one pynetdicom made from the same bytes and is only
read after decoding, so sharing it between associations changes nothing they see; the
`PresentationContext` each association negotiates on (its result and roles are written on it)
is a fresh copy, per association, of the one the item made first. Every other item
(application context, user information with its maximum PDU length, implementation UID, user
identity) is decoded as before, each time. Bytes that fail to decode raise as before and are
not remembered. The tables are bounded; a peer that proposes ever-new contexts only fills them
(then they are emptied and refilled).
"""

from __future__ import annotations

import threading
from typing import Any, TypeVar

from pynetdicom.pdu import A_ASSOCIATE_RQ
from pynetdicom.pdu_items import PDU_ITEM_TYPES, PresentationContextItemAC, PresentationContextItemRQ
from pynetdicom.presentation import PresentationContext

_Context = TypeVar("_Context", bound=PresentationContext)

_PRESENTATION_CONTEXT_RQ = 0x20
_LIMIT = 4096  # items: ~120 per proposal, a few hundred bytes each

_known: dict[bytes, PresentationContextItemRQ] = {}
# (context ID, result, transfer syntax) -> the AC item's fields and its encoding.
_answers: dict[tuple[int, int, str], tuple[dict[str, Any], bytes]] = {}
_rq_to_primitive = PresentationContextItemRQ.to_primitive
_PRIMITIVE = "_scanonce_primitive"
_ac_from_primitive = PresentationContextItemAC.from_primitive
_ac_encode = PresentationContextItemAC.encode
_ENCODED = "_scanonce_encoded"
_installed = False
_lock = threading.Lock()


def known_items(self: A_ASSOCIATE_RQ, bytestream: bytes) -> list[Any]:
    """pynetdicom's `PDU._wrap_generate_items` for an A-ASSOCIATE-RQ, with Presentation
    Context items seen before taken from the table."""
    items: list[Any] = []
    for item_type, item_bytes in self._generate_items(bytestream):
        if item_type == _PRESENTATION_CONTEXT_RQ:
            context = _known.get(item_bytes)
            if context is None:
                context = PresentationContextItemRQ()
                context.decode(item_bytes)
                if len(_known) >= _LIMIT:
                    _known.clear()
                _known[item_bytes] = context
            items.append(context)
        else:
            item = PDU_ITEM_TYPES[item_type]()
            item.decode(item_bytes)
            items.append(item)
    return items


def known_rq_to_primitive(self: PresentationContextItemRQ) -> PresentationContext:
    """pynetdicom's `PresentationContextItemRQ.to_primitive`: a new `PresentationContext` for
    each association (its negotiation sets the result and roles on it), copied from the one
    this item made first instead of built again with each UID set and checked."""
    made = self.__dict__.get(_PRIMITIVE)
    if made is None:
        made = _rq_to_primitive(self)
        setattr(self, _PRIMITIVE, made)
    return copy_context(made)


def copy_context(context: _Context) -> _Context:
    """A copy of `context` that negotiation may change (result, roles, transfer syntaxes) without
    changing the original: its own transfer syntax list, the UIDs (immutable) shared. Not
    `copy.copy`/`deepcopy`, whose `__reduce_ex__` round trip was most of the copy's time."""
    new = object.__new__(type(context))
    new.__dict__.update(context.__dict__)
    new._transfer_syntax = list(context._transfer_syntax)
    return new


def known_ac_from_primitive(self: PresentationContextItemAC, primitive: PresentationContext) -> None:
    """pynetdicom's `PresentationContextItemAC.from_primitive`, taking an answer given before
    (its fields, and its bytes for `known_ac_encode`)."""
    syntaxes = primitive.transfer_syntax
    context_id, result = primitive.context_id, primitive.result
    if not (syntaxes and isinstance(context_id, int) and isinstance(result, int)):
        _ac_from_primitive(self, primitive)  # raises or builds as pynetdicom does
        return
    key = (context_id, result, str(syntaxes[0]))
    answer = _answers.get(key)
    if answer is None:
        _ac_from_primitive(self, primitive)
        answer = (dict(self.__dict__), _ac_encode(self))
        if len(_answers) >= _LIMIT:
            _answers.clear()
        _answers[key] = answer
    # The sub-item list is shared: nothing changes an item once it is built for sending.
    self.__dict__.update(answer[0])
    setattr(self, _ENCODED, answer[1])


def known_ac_encode(self: PresentationContextItemAC) -> bytes:
    encoded = self.__dict__.get(_ENCODED)
    return encoded if encoded is not None else _ac_encode(self)


def install() -> None:
    """Switch pynetdicom's A-ASSOCIATE-RQ decoding, negotiation primitives and A-ASSOCIATE-AC
    items to the remembering ones (idempotent)."""
    global _installed
    with _lock:
        if _installed:
            return
        A_ASSOCIATE_RQ._wrap_generate_items = known_items  # type: ignore[method-assign,assignment]
        PresentationContextItemRQ.to_primitive = known_rq_to_primitive  # type: ignore[method-assign]
        PresentationContextItemAC.from_primitive = known_ac_from_primitive  # type: ignore[method-assign]
        PresentationContextItemAC.encode = known_ac_encode  # type: ignore[method-assign,assignment]
        _installed = True
