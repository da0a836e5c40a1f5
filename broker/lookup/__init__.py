"""The prior lookup behind every clinician-facing interface (relevance, dose, ranking, avoided
repeats).

Built so far: the relevance engine (`relevance`, `vocabulary`, `schemas`, data files under `data/`),
pure logic that decides for every prior whether it is relevant to a planned exam, whether it lies in
the setting's look-back window, and why (docs/lookup.md).

May import: broker.errors, broker.settings, broker.dicom, the standard library and well-kept
libraries; nothing else of the broker (the index and the routes call into it, not the reverse).
"""
