"""Benchmarks of the try-on flows against the local emulator (``make bench``)."""
