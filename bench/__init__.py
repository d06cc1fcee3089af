"""Benchmarks of salm-fast: ``python -m bench <subcommand>`` (see ``bench/__main__.py``).

Results go to ``bench/results_<name>.json`` (machine-readable, with the machine, the code
version and the date they came from) and to a section of ``bench/RESULTS.md``.
"""
