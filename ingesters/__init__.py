"""Ingesters: services that turn a detector's own streaming protocol into tangomesh blocks.

Each is a peer package member (it imports only the kit, ``services/``): a
sans-IO decoder of the protocol, a Tango-free component that reads the
detector and sends through :class:`services.source.SourceClient`, and a thin
device. See docs/ingesters.md.
"""
