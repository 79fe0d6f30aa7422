"""Benchmarks of the broker against the targets in DESIGN.md §9 (``make bench``).

Everything here drives real processes on 127.0.0.1: the broker is started with
``broker serve``, load comes from a separate process, and every database, server
and temporary folder the run creates is removed again, even on Ctrl-C.
Timings live here and never in the test suite.
"""
