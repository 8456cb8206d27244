"""The JetStream streams of the contract, created or updated on every start.

KAYA_EVENTS  kaya.evt.<entity>.<id>   every committed event, deduplicated by Nats-Msg-Id
KAYA_DLQ     kaya.dlq.<consumer>      events a consumer gave up on, with why
"""

from __future__ import annotations

from nats.js import JetStreamContext
from nats.js.api import RetentionPolicy, StorageType, StreamConfig
from nats.js.errors import NotFoundError

from kaya.app.config import EventsConfig

EVENTS_STREAM = "KAYA_EVENTS"
DLQ_STREAM = "KAYA_DLQ"
EVENT_SUBJECTS = "kaya.evt.>"
DLQ_SUBJECTS = "kaya.dlq.>"


def event_subject(entity: str, entity_id: str) -> str:
    return f"kaya.evt.{entity}.{entity_id}"


def dlq_subject(consumer: str) -> str:
    return f"kaya.dlq.{consumer}"


def stream_configs(config: EventsConfig) -> list[StreamConfig]:
    return [
        StreamConfig(
            name=EVENTS_STREAM,
            description="Kaya: every committed event, per entity in version order",
            subjects=[EVENT_SUBJECTS],
            retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE,
            num_replicas=config.replicas,
            max_age=config.max_age,
            max_bytes=config.max_bytes,
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


def subscribes(filter_subject: str, subject: str) -> bool:
    """Whether a NATS filter subject (with `*` and `>`) matches a subject."""
    pattern, tokens = filter_subject.split("."), subject.split(".")
    for i, token in enumerate(pattern):
        if token == ">":
            return len(tokens) > i
        if i >= len(tokens) or token not in ("*", tokens[i]):
            return False
    return len(pattern) == len(tokens)
