"""DIMSE (PS3.7/PS3.4): the broker as a DICOM node.

- `broker.dimse.scp`: `start_scp(state=...)` / `stop_scp(handle)`, the SCP for C-ECHO, C-STORE
  (into the STOW-RS ingest path), C-FIND, C-MOVE and C-GET (Patient Root and Study Root).
- `broker.dimse.scu`: `echo`, `find`, `move`, `get`, `store`: blocking client functions for the other
  domains; `Unavailable` names a peer that cannot be reached, `DimseStatusError` a failure status.
- `broker.dimse.service`: the rules without the network (identifier -> index query, statuses,
  calling AE -> facility, move destinations).
"""
