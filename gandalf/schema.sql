-- Gandalf storage schema: migration 1 (schema version 1).
--
-- gandalf/storage/sqlite.py applies this file as MIGRATIONS[0] inside one
-- transaction and records the version in schema_version. Once released it is
-- never edited: later schema changes are appended as new migrations, so that
-- existing databases are upgraded in place without losing data.
--
-- Secrets never live here: api_keys keeps only the SHA-256 hex of each key,
-- and providers keep the unexpanded ${ENV} reference of their upstream key.

CREATE TABLE IF NOT EXISTS schema_version (
    version INTEGER NOT NULL
);

CREATE TABLE IF NOT EXISTS organizations (
    id         TEXT PRIMARY KEY,
    name       TEXT NOT NULL,
    created_at REAL NOT NULL
);

CREATE TABLE IF NOT EXISTS teams (
    id         TEXT PRIMARY KEY,
    org_id     TEXT NOT NULL REFERENCES organizations (id),
    name       TEXT NOT NULL,
    created_at REAL NOT NULL
);

CREATE INDEX IF NOT EXISTS teams_org_id ON teams (org_id);

CREATE TABLE IF NOT EXISTS providers (
    name        TEXT PRIMARY KEY,
    type        TEXT NOT NULL,
    base_url    TEXT NOT NULL DEFAULT '',
    api_key_ref TEXT,                            -- the unexpanded ${ENV} reference, NEVER a secret
    models      TEXT NOT NULL DEFAULT '[]',      -- JSON array of model names
    priority    INTEGER NOT NULL DEFAULT 1,
    timeout_ms  INTEGER NOT NULL DEFAULT 30000,
    enabled     INTEGER NOT NULL DEFAULT 1,
    latency_ms  INTEGER NOT NULL DEFAULT 0,
    source      TEXT NOT NULL DEFAULT 'config',  -- 'config' | 'cli' | 'api'
    updated_at  REAL NOT NULL
);

CREATE TABLE IF NOT EXISTS routes (
    model_alias TEXT PRIMARY KEY,
    targets     TEXT NOT NULL,                   -- JSON array of {provider, model, priority, weight}
    strategy    TEXT NOT NULL DEFAULT 'priority',
    source      TEXT NOT NULL DEFAULT 'config',  -- 'config' | 'cli' | 'api'
    updated_at  REAL NOT NULL
);

CREATE TABLE IF NOT EXISTS api_keys (
    id             TEXT PRIMARY KEY,
    name           TEXT NOT NULL,
    key_hash       TEXT UNIQUE NOT NULL,         -- sha256 hex of the key; the key itself is never stored
    prefix         TEXT NOT NULL,                -- first 8 characters, for display
    org_id         TEXT NOT NULL DEFAULT 'default',
    team_id        TEXT,
    role           TEXT NOT NULL DEFAULT 'member',
    allowed_models TEXT,                         -- JSON array of aliases; NULL: every route
    expires_at     REAL,                         -- unix seconds; NULL: never
    revoked        INTEGER NOT NULL DEFAULT 0,
    created_at     REAL NOT NULL,
    source         TEXT NOT NULL DEFAULT 'cli'   -- 'config' | 'cli' | 'api'
);

CREATE INDEX IF NOT EXISTS api_keys_org_id ON api_keys (org_id);

CREATE TABLE IF NOT EXISTS usage_records (
    id                INTEGER PRIMARY KEY,  -- rowid alias: no AUTOINCREMENT bookkeeping per insert
    request_id        TEXT NOT NULL,
    key_id            TEXT,
    org_id            TEXT,
    model_alias       TEXT NOT NULL,
    target_model      TEXT,
    provider          TEXT,
    prompt_tokens     INTEGER NOT NULL DEFAULT 0,
    completion_tokens INTEGER NOT NULL DEFAULT 0,
    total_tokens      INTEGER NOT NULL DEFAULT 0,
    latency_ms        REAL NOT NULL DEFAULT 0,
    status            INTEGER NOT NULL,
    created_at        REAL NOT NULL,
    endpoint          TEXT NOT NULL DEFAULT 'chat'
);

CREATE INDEX IF NOT EXISTS usage_records_created_at ON usage_records (created_at);
CREATE INDEX IF NOT EXISTS usage_records_key_id_created_at ON usage_records (key_id, created_at);
