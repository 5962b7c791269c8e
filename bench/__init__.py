"""Benchmarks, run by `make bench` against a scratch database; not part of `make test`."""
