-- Prices of a provider model (DESIGN §18): micro-USD per million tokens, NULL = no price.
-- Existing models get NULL: no price until one is set.
ALTER TABLE provider_models ADD COLUMN price_input BIGINT;
ALTER TABLE provider_models ADD COLUMN price_output BIGINT;
ALTER TABLE provider_models ADD COLUMN price_cache_read BIGINT;
ALTER TABLE provider_models ADD COLUMN price_cache_write BIGINT;
