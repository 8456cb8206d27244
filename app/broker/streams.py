"""The JetStream streams of the contract, created or updated on every start.

KAYA_EVENTS  kaya.evt.<entity>.<id>   every committed event, deduplicated by Nats-Msg-Id
             kaya.epoch.<shard>       a cluster's shard epoch markers (app/cluster/leases.py)
KAYA_DLQ     kaya.dlq.<consumer>      events a consumer gave up on, with why
"""

from __future__ import annotations

from nats.js import JetStreamContext
from nats.js.api import RetentionPolicy, StorageType, StreamConfig
from nats.js.errors import NotFoundError

from kaya.actors.wire import (
    DLQ_STREAM,
    DLQ_SUBJECTS,
    EPOCH_SUBJECTS,
    EVENT_SUBJECTS,
    EVENTS_STREAM,
)
from kaya.app.config import EventsConfig


def stream_configs(config: EventsConfig) -> list[StreamConfig]:
    return [
        StreamConfig(
            name=EVENTS_STREAM,
            description="Kaya: every committed event, per entity in version order",
            subjects=[EVENT_SUBJECTS, EPOCH_SUBJECTS],
            retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE,
            num_replicas=config.replicas,
            max_age=config.max_age,
            max_bytes=config.max_bytes,
            # a cluster writes a turn's events as one atomic batch (nats-server 2.12+)
            allow_atomic=True,
            duplicate_window=config.duplicate_window,
        ),
        StreamConfig(
            name=DLQ_STREAM,
            description="Kaya: events consumers gave up on (kaya dlq list|show|replay|purge)",
            subjects=[DLQ_SUBJECTS],
            retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE,
            num_replicas=config.replicas,
            max_age=config.dlq_max_age,
            duplicate_window=config.duplicate_window,
        ),
    ]


async def ensure_streams(js: JetStreamContext, config: EventsConfig) -> None:
    """Create the streams, or bring an existing one's settings in line with the config."""
    for stream in stream_configs(config):
        try:
            await js.update_stream(stream)
        except NotFoundError:
            await js.add_stream(stream)
