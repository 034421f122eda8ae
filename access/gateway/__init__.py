"""What runs on a gateway host: the agent that pulls the state (``agent.py``, run by the units of
``systemd.py``), OpenVPN hooks, the bastion (sshd, or ``bastion.py`` per cluster) and its legs, the state layout.

Standalone by design (DESIGN.md "Layers"): no Django, no database. Everything here works from the state
directory the gateway last pulled from the portal, so access keeps working while the portal is down — for the
state's ``max_age``; then every hook refuses everyone (``access.gateway.state.check_fresh``).
Only :mod:`access.pki` and :mod:`access.attrcerts` are imported from the rest of the project (for offline
AC verification).
"""
