"""Shared by the clusters tests that run a real worker: wait for a cluster's workflow to reach a state."""

from __future__ import annotations

import time

from clusters.models import VirtualCluster


def wait_state(cluster_id: int, *states: str, timeout: float = 30.0) -> VirtualCluster:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        cluster = VirtualCluster.objects.get(pk=cluster_id)
        if cluster.state in states:
            return cluster
        time.sleep(0.05)
    raise AssertionError(f"cluster {cluster_id} is {cluster.state}, not {states} after {timeout}s")
