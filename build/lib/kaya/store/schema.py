"""DDL of the store. One SQLite file per node, WAL mode.

The `events` table is also the outbox: the relay publishes rows after its checkpoint.
A trigger refuses any event whose version is not exactly the stream's next one, so
stream versions stay gapless and unique whatever a caller does.
"""

from __future__ import annotations

SCHEMA_VERSION = 1

DDL = """
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
) WITHOUT ROWID;

CREATE TABLE IF NOT EXISTS events (
    position       INTEGER PRIMARY KEY,
    event_id       TEXT    NOT NULL UNIQUE,
    entity         TEXT    NOT NULL,
    entity_id      TEXT    NOT NULL,
    version        INTEGER NOT NULL,
    type           TEXT    NOT NULL,
    schema_version INTEGER NOT NULL,
    data           BLOB    NOT NULL,
    recorded_at    REAL    NOT NULL,
    command_id     TEXT,
    traceparent    TEXT,
    UNIQUE (entity, entity_id, version)
);

CREATE TRIGGER IF NOT EXISTS events_next_version BEFORE INSERT ON events
BEGIN
    SELECT RAISE(ABORT, 'version conflict')
    WHERE NEW.version != COALESCE(
        (SELECT MAX(version) FROM events
          WHERE entity = NEW.entity AND entity_id = NEW.entity_id), 0) + 1;
END;

CREATE TABLE IF NOT EXISTS snapshots (
    entity       TEXT    NOT NULL,
    entity_id    TEXT    NOT NULL,
    version      INTEGER NOT NULL,
    state_schema INTEGER NOT NULL,
    state        BLOB    NOT NULL,
    PRIMARY KEY (entity, entity_id)
) WITHOUT ROWID;

CREATE TABLE IF NOT EXISTS replies (
    entity       TEXT NOT NULL,
    entity_id    TEXT NOT NULL,
    command_id   TEXT NOT NULL,
    request_hash BLOB NOT NULL,
    body         BLOB NOT NULL,
    recorded_at  REAL NOT NULL,
    PRIMARY KEY (entity, entity_id, command_id)
) WITHOUT ROWID;

CREATE INDEX IF NOT EXISTS replies_by_age ON replies (recorded_at);

CREATE TABLE IF NOT EXISTS checkpoints (
    name     TEXT PRIMARY KEY,
    position INTEGER NOT NULL
) WITHOUT ROWID;
"""
