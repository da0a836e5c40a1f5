"""The DIMSE client is tested against the broker's own SCP (and dcmtk): reuse the SCP nodes."""

from tests.dimse.conftest import archive, closed_node, loaded_node, node  # noqa: F401
