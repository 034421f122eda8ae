"""The tests' fake devices are the simulated fabric (``network.drivers.simulated``), as platform ``fake``."""

from network.drivers.simulated import load, register, save  # noqa: F401
