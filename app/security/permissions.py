"""Subject permissions per role, generated from the app and the wire contract.

    admin    everything (streams, consumers, the schema registry, `nats micro`)
    node     serve the shards, publish the app's events and notifications, use the
             JetStream API of Kaya's streams, but not delete or purge a stream, nor
             write the schema registry
    client   request kaya.cmd.*, kaya.qry.*, kaya.view.* and receive the replies
    reader   what a client may, but commands; read KAYA_EVENTS (consumers, message gets)

Users live in the server's config, one per role, and TLS says which one a connection
is: nats-server maps the verified client certificate's subject (`CN=kaya-node`) to the
user of that name (`verify_and_map`). Chosen over NATS decentralized JWT auth
(operator, account, user .creds): one server config is all there is to deploy, the
certificate that encrypts a connection is also its credential (nothing else to issue,
leak or rotate), and the roles are fixed by the contract, not managed at runtime. An
operator who needs accounts can still map the same subjects into JWT user claims.

The node's events are allowed per entity of the app (`kaya.evt.<entity>.>`): a node
serving an app cannot publish an event for an entity that app does not have.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from kaya.actors.wire import DLQ_STREAM, EVENTS_STREAM
from kaya.app.cluster.leases import BUCKET as LEASE_BUCKET
from kaya.app.schemas.registry import SCHEMAS_BUCKET
from kaya.app.security.keys import KEYS_BUCKET
from kaya.app.security.pki import role_subject


@dataclass(frozen=True)
class Permissions:
    publish: list[str] = field(default_factory=list)
    publish_deny: list[str] = field(default_factory=list)
    subscribe: list[str] = field(default_factory=list)
    everything: bool = False


def role_permissions(entities: Iterable[str]) -> dict[str, Permissions]:
    """Every role's permissions for an app whose entities are `entities`."""
    events = [f"kaya.evt.{name}.>" for name in sorted(entities)]
    # the server checks a publish on the subject its mapping makes of it, too
    commands = ["kaya.cmd.>", "kaya.shard.*.cmd.>"]
    reads = ["kaya.qry.>", "kaya.shard.*.qry.>", "kaya.view.>"]
    jetstream_read = [
        "$JS.API.INFO",
        "$JS.API.STREAM.NAMES",
        "$JS.API.STREAM.LIST",
        f"$JS.API.STREAM.INFO.{EVENTS_STREAM}",
        f"$JS.API.STREAM.INFO.{DLQ_STREAM}",
        f"$JS.API.STREAM.MSG.GET.{EVENTS_STREAM}",
        f"$JS.API.DIRECT.GET.{EVENTS_STREAM}",
        f"$JS.API.DIRECT.GET.{EVENTS_STREAM}.>",
        f"$JS.API.CONSUMER.CREATE.{EVENTS_STREAM}",
        f"$JS.API.CONSUMER.CREATE.{EVENTS_STREAM}.>",
        f"$JS.API.CONSUMER.INFO.{EVENTS_STREAM}.*",
        f"$JS.API.CONSUMER.DELETE.{EVENTS_STREAM}.*",
        f"$JS.API.CONSUMER.MSG.NEXT.{EVENTS_STREAM}.*",
        f"$JS.API.CONSUMER.LIST.{EVENTS_STREAM}",
        f"$JS.API.CONSUMER.NAMES.{EVENTS_STREAM}",
        f"$JS.API.CONSUMER.LIST.{DLQ_STREAM}",
        f"$JS.API.CONSUMER.NAMES.{DLQ_STREAM}",
        f"$JS.API.STREAM.MSG.GET.{DLQ_STREAM}",  # the dead letters, to look at
        f"$JS.API.DIRECT.GET.{DLQ_STREAM}.>",
        "$JS.FC.>",
        "$JS.ACK.>",
    ]
    return {
        "admin": Permissions(everything=True),
        "node": Permissions(
            publish=[
                *events,
                "kaya.epoch.>",
                "kaya.notify.>",
                "kaya.dlq.>",
                "kaya.step.>",
                "kaya.shard.*.step.>",
                "$JS.API.>",
                "$JS.ACK.>",
                "$JS.FC.>",
                f"$KV.{LEASE_BUCKET}.>",
                f"$KV.{KEYS_BUCKET}.>",
                "$SRV.>",
                "_INBOX.>",
            ],
            publish_deny=[
                "$JS.API.STREAM.DELETE.>",
                "$JS.API.STREAM.PURGE.>",
                f"$JS.API.STREAM.MSG.DELETE.KV_{KEYS_BUCKET}",  # forgetting is the admin's
                f"$JS.API.STREAM.CREATE.KV_{SCHEMAS_BUCKET}",
                f"$JS.API.STREAM.UPDATE.KV_{SCHEMAS_BUCKET}",
                f"$KV.{SCHEMAS_BUCKET}.>",
            ],
            subscribe=[
                "kaya.shard.>",
                "kaya.cmd.>",
                "kaya.qry.>",
                "kaya.view.>",
                "kaya.health",
                f"$KV.{KEYS_BUCKET}.>",  # a key erased anywhere: drop it, reload the entity
                "$SRV.>",
                "_INBOX.>",
            ],
        ),
        "client": Permissions(
            publish=[*commands, *reads],
            subscribe=["_INBOX.>"],
        ),
        "reader": Permissions(
            publish=[*reads, *jetstream_read],
            subscribe=["_INBOX.>"],
        ),
    }


def _list(values: list[str]) -> str:
    return "[" + ", ".join(f'"{v}"' for v in values) + "]"


def authorization_block(entities: Iterable[str]) -> list[str]:
    """The server config's `authorization` block: one user per role, named by its
    certificate's subject (with `tls { verify_and_map: true }`)."""
    lines = ["authorization {", "  users = ["]
    for role, perms in role_permissions(entities).items():
        user = f'    {{ user: "{role_subject(role)}"'
        if perms.everything:
            lines.append(user + " }")
            continue
        publish = f"allow: {_list(perms.publish)}"
        if perms.publish_deny:
            publish += f", deny: {_list(perms.publish_deny)}"
        lines.append(
            user + f", permissions: {{ publish: {{ {publish} }}, subscribe: {{ allow:"
            f" {_list(perms.subscribe)} }} }} }}"
        )
    lines += ["  ]", "}"]
    return lines


def may_publish(role: str, subject: str) -> bool:
    """Whether `role` may publish `subject` (entity events aside: a tool never sends those)."""
    from kaya.actors.wire import subscribes

    perms = role_permissions(()).get(role)
    if perms is None or perms.everything:
        return True
    if any(subscribes(pattern, subject) for pattern in perms.publish_deny):
        return False
    return any(subscribes(pattern, subject) for pattern in perms.publish)
