"""The DIMSE interface (PS3.7/PS3.4): the broker as a DICOM node.

- `scp`: `start_scp(state=...)` / `stop_scp(handle)`, the SCP for C-ECHO, C-STORE (into the same
  ingest path as STOW-RS), C-FIND, C-MOVE and C-GET (Patient Root and Study Root); each handler
  documents the statuses it returns.
- `receivers`: `ReceiverSupervisor`, the extra SCP processes on the same port
  (settings.dimse_receivers), started and restarted by the serving process.
- `handoff`: on SQLite, the receivers' C-STOREs committed by the serving process's one writer.
- `guards`: the lock-out guards' connection counts in shared memory, so their limits hold for
  all processes on the port together.
- `service`: the rules without the network (identifier -> index query, statuses, calling AE ->
  facility, move destinations).

Owns no tables. The DIMSE client (SCU) the other domains use is `broker.peers.dimse`.
May import every layer below the interfaces.
"""
