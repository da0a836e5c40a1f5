"""SMART App Launch (EHR launch): the pages opened from an EHR on its current patient."""
