"""The benchmark harness of issue 9: `make bench` (python -m tests.bench.run).

pymta against the systems its users would pick instead (Postfix, Dovecot),
on the same machine, alternating A B A B, medians and ratios.  Never part of
`make test`; only test_*.py files here are unit tests of pure helpers.
"""
