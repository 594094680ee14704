"""Operator tools on top of the services: the ``tangomesh`` CLI, the embedded
database and mesh launchers, the demo, the scan driver, control-system adapters.
Ops may import any service; no service imports ops."""
