"""pynetdicom's UID checks, remembered for the standard UIDs that arrive over and over.

pynetdicom checks every UID it is given, each time, by regular expression (twice: pydicom's
`UID.is_valid` and its own validator, which also imports `_config` on every call). An
A-ASSOCIATE-RQ from dcmtk's storescu proposes ~120 presentation contexts, each with its
abstract syntax and several transfer syntaxes: measured with py-spy, those checks were about a
third of the serving process's CPU per association (~20 ms for one `storescu` of one file),
and they run again for the UIDs of every DIMSE message.

`install()` wraps pynetdicom's `set_uid` (in each module that imported it) and
`PresentationContext.add_transfer_syntax` so that a value seen before, which was a valid,
conformant DICOM-defined UID (root 1.2.840.10008: the same few hundred SOP classes and
transfer syntaxes), returns the UID made the first time without being checked again. Anything
else (private or unknown UIDs, invalid ones, with their warnings and errors) goes through
pynetdicom's code every time, as before.
"""

from __future__ import annotations

import threading
from typing import Any

from pydicom.uid import UID
from pynetdicom import ae, dimse_primitives, pdu_items, pdu_primitives, presentation, utils
from pynetdicom.presentation import PresentationContext

# Bounded: the DICOM-defined UIDs are a few hundred; a peer inventing values under the root
# cannot make this grow past the bound.
_LIMIT = 4096
_DICOM_ROOT = "1.2.840.10008."

_known: dict[str | bytes, UID] = {}
_set_uid = utils.set_uid
_add_transfer_syntax = PresentationContext.add_transfer_syntax
_installed = False
_lock = threading.Lock()


def _remember(value: object, uid: object) -> None:
    if (
        isinstance(uid, UID)
        and type(value) in (str, bytes, UID)
        and uid.startswith(_DICOM_ROOT)
        and uid.is_valid
        and len(_known) < _LIMIT
    ):
        _known[value if type(value) is not UID else str(value)] = uid  # type: ignore[index]


def known_set_uid(
    value: Any, name: str, allow_empty: bool = True, allow_none: bool = True, validate: bool = True
) -> UID | None:
    """pynetdicom's `set_uid`, remembering a valid DICOM-defined UID's result."""
    if type(value) in (str, bytes, UID):
        known = _known.get(value)
        if known is not None:
            return known
    uid = _set_uid(value, name, allow_empty, allow_none, validate)
    if validate:
        _remember(value, uid)
    return uid


def known_add_transfer_syntax(self: PresentationContext, syntax: Any) -> None:
    """pynetdicom's `PresentationContext.add_transfer_syntax`, without the checks for a
    transfer syntax that passed them before (they only warn or refuse, and it did neither)."""
    if type(syntax) in (str, bytes, UID):
        known = _known.get(syntax)
        if known is not None and known.is_transfer_syntax:
            if known not in self._transfer_syntax:
                self._transfer_syntax.append(known)
            return
    _add_transfer_syntax(self, syntax)
    added = self._transfer_syntax[-1] if self._transfer_syntax else None
    if added is not None and added.is_transfer_syntax and str(added) == _text(syntax):
        _remember(syntax, added)


def _text(value: Any) -> str | None:
    if isinstance(value, bytes):
        try:
            return value.decode("ascii")
        except UnicodeDecodeError:
            return None
    return str(value) if isinstance(value, str) else None


def install() -> None:
    """Switch pynetdicom to the remembering checks (idempotent)."""
    global _installed
    with _lock:
        if _installed:
            return
        for module in (utils, ae, dimse_primitives, pdu_items, pdu_primitives, presentation):
            if getattr(module, "set_uid", None) is _set_uid:
                module.set_uid = known_set_uid  # type: ignore[attr-defined]
        PresentationContext.add_transfer_syntax = known_add_transfer_syntax  # type: ignore[method-assign]
        _installed = True
