"""Status and FailureReason codes, named once.

Store failures are the C-STORE statuses of PS3.4 Annex B.2.3 (Storage Service Class), which
PS3.18 (Store Instances response, FailureReason (0008,1197)) reuses; the general DIMSE codes
come from PS3.7 Annex C. (helper-5 may refine these with citations; keep the names.)
"""

from __future__ import annotations

# PS3.4 B.2.3 Storage statuses, reused as STOW-RS FailureReason values.
OUT_OF_RESOURCES = 0xA700
DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
CANNOT_UNDERSTAND = 0xC000
# PS3.7 C.4 general statuses.
PROCESSING_FAILURE = 0x0110
DUPLICATE_SOP_INSTANCE = 0x0111
SOP_CLASS_NOT_SUPPORTED = 0x0122
NOT_AUTHORIZED = 0x0124
# PS3.18: the instance's Study Instance UID differs from the one in the request URL.
STUDY_UID_MISMATCH = DATASET_DOES_NOT_MATCH_SOP_CLASS
