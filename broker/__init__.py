"""ScanOnce, the inter-facility image-sharing broker: one package per domain, in layers (lowest
first): errors, settings, db, clikit, logfilters (and `storage`, outside this package) -> dicom
-> security -> deps -> jobs, facilities, peers -> index -> identity -> federation, imports, lookup,
demo -> the interfaces dicomweb, dimse, fhir -> app, cli. A package imports only from layers
below its own (tests/test_quality.py runs the import-linter contract in pyproject.toml);
docs/architecture.md draws the map.
"""
