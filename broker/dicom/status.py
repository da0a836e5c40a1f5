"""Status and FailureReason codes, named once so STOW-RS and C-STORE report the same reasons.

STOW-RS FailureReason (0008,1197) values are those of PS3.18 Annex I, Table I.2-2 "Store Instances
Response Failure Reason Values" (checked against PS3.18 2024c), which are the C-STORE statuses of
PS3.4 Annex B.2.3 (Table B.2-1) plus two general DIMSE statuses of PS3.7 Annex C. The table
gives ranges (A7xx, A9xx, Cxxx); the base of each range is used here. PS3.18 Table I.2-2 allows
additional codes "to address the semantics of other issues"; where one is used below, the comment
says which standard row it refines.
"""

from __future__ import annotations

# -- PS3.18 Table I.2-2 (= PS3.4 Table B.2-1 for the first three) ------------------------------
# A7xx "Refused out of Resources": not stored because the origin server was out of resources.
OUT_OF_RESOURCES = 0xA700
# A9xx "Error: Data Set does not match SOP Class".
DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
# Cxxx "Error: Cannot understand": certain Data Elements cannot be understood (e.g. not DICOM,
# truncated, a required UID missing or invalid).
CANNOT_UNDERSTAND = 0xC000
# C122 "Referenced Transfer Syntax not supported".
TRANSFER_SYNTAX_NOT_SUPPORTED = 0xC122
# 0110 "Processing failure" (PS3.7 Annex C): a general failure in processing the operation.
PROCESSING_FAILURE = 0x0110
# 0122 "Referenced SOP Class not supported" (PS3.7 Annex C; PS3.18 Table I.2-2).
SOP_CLASS_NOT_SUPPORTED = 0x0122

# -- PS3.7 Annex C general statuses used by the DIMSE side ---------------------------------------
# 0111 "Duplicate SOP Instance" (PS3.7 Annex C). Used as the STOW-RS FailureReason for a different
# object sent under an already stored SOP Instance UID (an additional code as Table I.2-2 allows).
DUPLICATE_SOP_INSTANCE = 0x0111
# 0124 "Refused: Not Authorized" (PS3.7 Annex C).
NOT_AUTHORIZED = 0x0124

# PS3.18 10.5.3 names a Study Instance UID that differs from the one in the request URL as a
# "conflict in the request" but gives it no code of its own; it is reported in the A9xx range
# (the Data Set does not fit what the request declared it to be).
STUDY_UID_MISMATCH = DATASET_DOES_NOT_MATCH_SOP_CLASS

# Readable names for a FailureReason value (for messages and logs; never patient data).
FAILURE_REASON_TEXT: dict[int, str] = {
    OUT_OF_RESOURCES: "Refused: out of resources",
    DATASET_DOES_NOT_MATCH_SOP_CLASS: "Error: Data Set does not match SOP Class",
    CANNOT_UNDERSTAND: "Error: cannot understand",
    TRANSFER_SYNTAX_NOT_SUPPORTED: "Referenced Transfer Syntax not supported",
    PROCESSING_FAILURE: "Processing failure",
    SOP_CLASS_NOT_SUPPORTED: "Referenced SOP Class not supported",
    DUPLICATE_SOP_INSTANCE: "Duplicate SOP Instance with different content",
    NOT_AUTHORIZED: "Refused: not authorized",
}
