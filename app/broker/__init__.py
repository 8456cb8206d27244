"""The NATS side of a node: the client adapter, the embedded server, the streams, the lean pull."""
