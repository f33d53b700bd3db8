"""sdserve: the `sdserve` command line on top of the three packages: core (engine), serving (Ray Serve),
batch_jobs (Ray Data), plus `sdserve bench` from benchmarks. It owns no logic of its own beyond parsing and
dispatch, and may import every other package; none of them imports it (tests/test_import_cycles.py).
"""
__version__ = "0.1.0"
