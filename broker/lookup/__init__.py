"""The prior lookup behind every clinician-facing interface (relevance, dose, ranking, avoided
repeats): not built yet.

May import: everything up to identity.
"""
