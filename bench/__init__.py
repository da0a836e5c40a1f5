"""Benchmarks, side by side with a peer (Orthanc) in one run."""
