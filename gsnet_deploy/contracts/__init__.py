"""On-disk contracts, torch-free: I/O names, manifests, derived-model names and sidecars, the atomic writer.

The bottom floor of the package (above ``errors``): everything that two packages must agree on
about files lives here, so that ``runtime`` (torch-free, for Jetsons) and ``export`` (torch) can
both import it without importing each other.
"""
