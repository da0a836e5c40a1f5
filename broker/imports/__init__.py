"""Import of an outside study into a local PACS with local identifiers (IHE IRWF.b): not built yet.

Will own the import job tables. May import: everything up to identity.
"""
