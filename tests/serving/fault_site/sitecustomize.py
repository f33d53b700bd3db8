"""Python imports `sitecustomize` at start-up from the first folder on sys.path that holds one. Only the replica
of test_health_replacement.py's fault deployment gets this folder on its PYTHONPATH (its runtime_env env_vars),
so only that worker process gets the simulated CUDA fault of tests/serving/fault_injection.py."""
from tests.serving.fault_injection import install

install()
