"""Console script ``TopologyManager <instance>`` (the name Starter runs)."""

from services.device import console_script
from topology_manager.device import TopologyManager

main = console_script(TopologyManager)
