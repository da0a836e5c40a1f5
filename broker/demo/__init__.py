"""Deterministic demo and test data: synthetic patients (children among them, and the traps that
test identity linking), studies of several modalities at several facilities, and the dose they
carry, written as modalities write it.

Exposes `synth` (the generators), `rdsr` (the CT Radiation Dose SR content a scanner writes)
and `service.load_demo` (what `scanonce demo` runs).
May import: layers below (errors, settings, db, storage, dicom, security, jobs, facilities, peers,
index, identity); never the interfaces.
"""
