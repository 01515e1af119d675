-- Timestamps are unix microseconds (BIGINT) so that one schema serves Postgres and SQLite.
CREATE TABLE config_state (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    version BIGINT NOT NULL,
    cluster_epoch TEXT NOT NULL
);
INSERT INTO config_state (id, version, cluster_epoch) VALUES (1, 1, gen_random_uuid()::text);

CREATE TABLE connections (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    provider TEXT NOT NULL,
    endpoint TEXT NOT NULL,
    credential BYTEA NOT NULL,
    options TEXT NOT NULL DEFAULT '{}',
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);

CREATE TABLE provider_models (
    id TEXT PRIMARY KEY,
    connection_id TEXT NOT NULL REFERENCES connections (id),
    name TEXT NOT NULL,
    remote TEXT NOT NULL,
    deployment TEXT,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    UNIQUE (connection_id, name)
);
CREATE INDEX provider_models_name ON provider_models (name);

CREATE TABLE virtual_keys (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    key_sha256 BYTEA NOT NULL UNIQUE,
    key_hint TEXT NOT NULL,
    enabled BOOLEAN NOT NULL,
    expires_at BIGINT,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);

CREATE TABLE assignments (
    id TEXT PRIMARY KEY,
    vkey_id TEXT NOT NULL REFERENCES virtual_keys (id),
    model_id TEXT NOT NULL REFERENCES provider_models (id),
    alias TEXT NOT NULL,
    tps BIGINT,
    burst BIGINT,
    tpm BIGINT,
    weight BIGINT NOT NULL DEFAULT 1,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);
CREATE INDEX assignments_vkey ON assignments (vkey_id);
CREATE INDEX assignments_model ON assignments (model_id);

-- Data planes seen by any control plane replica (not config: writes here do not bump the version).
CREATE TABLE data_planes (
    node_id TEXT PRIMARY KEY,
    build TEXT NOT NULL,
    applied_version BIGINT NOT NULL,
    last_seen BIGINT NOT NULL,
    connected BOOLEAN NOT NULL,
    error TEXT NOT NULL
);
