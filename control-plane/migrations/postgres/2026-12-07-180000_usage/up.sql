-- Hourly usage per (virtual key, assignment, hour) (DESIGN §18): one row per bucket, added to by
-- every batch a data plane reports; never a row per request. No foreign keys: rows outlive
-- deleted keys and assignments, with their ids and the names they had kept here.
-- hour: unix seconds of the hour's start. cost_pico_usd: 1e-12 USD, exact.
CREATE TABLE usage_hourly (
    vkey_id TEXT NOT NULL,
    assignment_id TEXT NOT NULL,
    hour BIGINT NOT NULL,
    vkey_name TEXT NOT NULL,
    model_id TEXT NOT NULL,
    model_name TEXT NOT NULL,
    alias TEXT NOT NULL,
    requests BIGINT NOT NULL,
    input_tokens BIGINT NOT NULL,
    output_tokens BIGINT NOT NULL,
    cache_read_tokens BIGINT NOT NULL,
    cache_write_tokens BIGINT NOT NULL,
    reasoning_tokens BIGINT NOT NULL,
    cost_pico_usd BIGINT NOT NULL,
    PRIMARY KEY (vkey_id, assignment_id, hour)
);
CREATE INDEX usage_hourly_hour ON usage_hourly (hour);

-- Batches already written, so that a resent batch is acknowledged without being added twice.
-- received_at: unix microseconds.
CREATE TABLE usage_batches (
    node_id TEXT NOT NULL,
    boot_id TEXT NOT NULL,
    sequence BIGINT NOT NULL,
    received_at BIGINT NOT NULL,
    PRIMARY KEY (node_id, boot_id, sequence)
);
