"""Running many bastionmq nodes as one broker on NATS with JetStream.

The design is docs/cluster.md: NATS routes messages between nodes, JetStream
stores what QoS 1/2 acknowledgements promise, and its key-value buckets hold
the session registry and retained messages. Nothing here is imported by the
single-process path.
"""
