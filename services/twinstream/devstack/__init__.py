"""The local development stack: real tansu, Milvus, Triton, Prometheus and the four services as
child processes (``stack.py``). Nothing under ``ingestion|embedding|indexing|matching`` imports it."""

from twinstream.devstack.stack import (
    DEFAULT_METRICS_PORTS,
    REPO_ROOT,
    SERVICES,
    LocalStack,
    ManagedProcess,
    MilvusServer,
    SeaweedS3,
    StackConfig,
    free_port,
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
