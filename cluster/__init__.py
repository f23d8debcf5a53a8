"""Where work runs: start or join Ray, storage, job submission."""

from cluster.runtime import embedded_logical_cpus, init_ray

__all__ = ["embedded_logical_cpus", "init_ray"]
