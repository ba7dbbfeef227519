"""Benchmarks: scripts that measure speed and accuracy on real data and write JSON and Markdown results.

Targets live here, not in timed unit tests. Each script names the command that reproduces its numbers.
"""
