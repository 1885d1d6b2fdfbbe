"""The local development stack: real tansu, Milvus, Triton, Prometheus and the four services as
child processes (``stack.py`` and ``triton.py``, both on ``process.py``). No service imports it
(the import contract in pyproject.toml)."""

from twinstream.devstack.process import REPO_ROOT, ManagedProcess, free_port
from twinstream.devstack.stack import (
    DEFAULT_METRICS_PORTS,
    SERVICES,
    LocalStack,
    MilvusServer,
    SeaweedS3,
    StackConfig,
    free_port_pair,
    milvus_distribution,
    prepare_bundles,
    running_milvus,
    running_stack,
    tansu_binary,
)
from twinstream.devstack.triton import TritonServer

__all__ = [
    "DEFAULT_METRICS_PORTS",
    "REPO_ROOT",
    "SERVICES",
    "LocalStack",
    "ManagedProcess",
    "MilvusServer",
    "SeaweedS3",
    "StackConfig",
    "TritonServer",
    "free_port",
    "free_port_pair",
    "milvus_distribution",
    "prepare_bundles",
    "running_milvus",
    "running_stack",
    "tansu_binary",
]
