"""Helpers every stage shares and that depend on nothing else in cptflow: atomic file I/O, counters and
provenance manifests, config dataclasses and the schema, logging, the stage command line."""
