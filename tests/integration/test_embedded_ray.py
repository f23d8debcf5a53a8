"""The embedded Ray (cluster.runtime.init_ray without an address), as its workers see it."""

from __future__ import annotations

import os


def test_every_worker_finds_the_embedded_ray_it_belongs_to(ray_session):
    """Ray code in a worker that looks for its cluster by itself, as Ray Train's placement-group
    cleaner does, finds this Ray: the lookup that failed with "Found multiple active Ray
    instances" beside another Ray on the machine (the two-node test's cluster) answers from
    RAY_ADDRESS before it looks at the machine's processes."""
    from ray._private.services import canonicalize_bootstrap_address_or_die

    @ray_session.remote(num_cpus=0)
    def lookup() -> tuple[str | None, str]:
        return os.environ.get("RAY_ADDRESS"), canonicalize_bootstrap_address_or_die(None)

    here = ray_session.get_runtime_context().gcs_address
    assert ray_session.get(lookup.remote()) == (here, here)
