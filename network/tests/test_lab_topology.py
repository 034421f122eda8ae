"""The lab's topology files (``manage.py lab up --topology FILE``): a malformed file is a ``TopologyError`` that
says what is wrong, never a traceback (no lab, no root needed)."""

from __future__ import annotations

import pytest

from network.lab import TopologyError, topology


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("t.yaml", "sites: [a]\nswitches: [sw-a]\n", r"switches\[0\] must be a mapping, not 'sw-a'"),
        ("t.yaml", "sites: [a]\nswitches:\n  - {name: sw, site: a, ports: [p1]}\n", r"ports\[0\] must be a mapping"),
        ("t.yaml", "sites: [a]\nhosts: h1\n", "hosts must be a list, not str"),
        ("t.yaml", "sites: [a]\ncores: [core]\n", r"cores\[0\] must be a mapping"),
        ("t.yaml", "- a\n- b\n", "must hold a mapping .*, not list"),
        ("t.yaml", "sites: a\n", "sites must be a list, not str"),
        ("t.yaml", "cores: []\n", "no sites"),
        ("t.yaml", "sites: " + "[" * 5000 + "]" * 5000 + "\n", "nested too deeply"),
        ("t.json", '{"sites": ' + "[" * 100000 + "]" * 100000 + "}", "nested too deeply"),
    ],
)
def test_malformed_lab_topologies_are_errors_not_tracebacks(tmp_path, name, text, message):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(TopologyError, match=message):
        topology.load(path)


def test_a_well_formed_file_still_loads(tmp_path):
    path = tmp_path / "t.yaml"
    path.write_text(
        "sites: [a]\nswitches:\n  - {name: sw-a, site: a, ports: [{name: p-h1, role: host_trunk}]}\n"
        "hosts:\n  - {name: h-a, site: a, switch: sw-a, port: p-h1}\n"
    )
    topo = topology.load(path)
    assert [h.name for h in topo.hosts] == ["h-a"] and topo.switch("sw-a").ports[0].name == "p-h1"
