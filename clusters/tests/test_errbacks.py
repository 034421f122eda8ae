"""The workflows' error callbacks wherever Celery runs them: a host's agent hands them on to the central worker
(its database role may not write the clusters' tables), the failure described as the scheduler reads it."""
# ruff: noqa: F401, F811 (the pytest fixture fabric is imported from clusters.tests.helpers)

from __future__ import annotations

from types import SimpleNamespace

from celery.exceptions import ChordError

from clusters import tasks
from clusters.models import VirtualCluster
from clusters.tests.helpers import create_cluster, fabric
from network import errbacks
from network.errors import DeviceChangeFailed


def test_an_error_callback_called_in_a_host_agent_is_handed_on_to_the_central_worker(
    fabric, alice, settings, monkeypatch
):
    """A host's agent runs a failed task's error callback (Celery calls it where the task failed): nothing is
    written there; the callback goes to the central worker's queue with the device's failure as text, and
    there it records the failure as it would have."""
    cid = create_cluster(alice)
    VirtualCluster.objects.filter(pk=cid).update(state="tearing_down")  # (its teardown failed in the agent)
    generation = VirtualCluster.objects.get(pk=cid).workflow_generation
    sent = []
    monkeypatch.setattr(tasks.teardown_failed, "apply_async", lambda args, **options: sent.append((args, options)))
    settings.AGENT = True
    failure = DeviceChangeFailed("brno1", "bridge refused", 7)
    tasks.teardown_failed(SimpleNamespace(id="failed-task"), failure, None, cid, generation)
    assert sent == [((None, "brno1: bridge refused", None, cid, generation), {"queue": "celery"})]
    assert VirtualCluster.objects.get(pk=cid).state_reason == ""  # nothing written in the agent

    settings.AGENT = False
    tasks.teardown_failed(*sent[0][0])  # as the central worker runs it
    assert VirtualCluster.objects.get(pk=cid).state_reason == "teardown incomplete: brno1: bridge refused"


def test_a_failure_is_described_with_its_device_and_a_described_one_is_kept():
    assert errbacks.describe(DeviceChangeFailed("sw-brno", "Invalid input", 3)) == "sw-brno: Invalid input"
    assert errbacks.describe("sw-brno: Invalid input") == "sw-brno: Invalid input"
    assert errbacks.describe(RuntimeError("boom")) == "RuntimeError: boom"
    assert errbacks.describe(ChordError("the chord callback failed")).startswith("ChordError: ")
