"""The prior lookup behind every clinician-facing interface: relevance, dose, ranking, avoided
repeats.

Built so far, pure logic with versioned data files (docs/lookup.md, docs/dose.md):
- the relevance engine (`relevance`, `vocabulary`, `schemas`, `data/`): whether each prior is
  relevant to a planned exam, whether it lies in the setting's look-back window, and why;
- per-study dose (`dose`, `dose_data/`): effective dose, SSDE, typical doses, cumulative dose, from
  the per-instance records `broker.dicom.dose` reads.

- the service (`service`, `models`, `routes`, `cli`): every study of a patient's person across
  facilities (through identity; unconfirmed links shown as such), judged, with dose, availability,
  cumulative dose and repeat cost; avoided repeats (docs/lookup.md "The lookup service").

May import: the pure modules above only broker.errors, broker.settings, broker.dicom, the standard
library and well-kept libraries (tests/lookup/test_layering.py holds them to it), so they can be
used anywhere; the service sits above them and may import everything up to identity
(docs/architecture.md).
"""
