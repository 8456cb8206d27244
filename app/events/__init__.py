"""Events out: the outbox relay, the consumer API and its runner, dead letters, rebuilds."""
