"""The protocol core: codec, topics, sessions, retained messages and routing.

Nothing here knows about sockets, TLS or configuration files: listeners hand
the core a transport and a PeerInfo, and bastionmq.app hands it its settings.
"""
