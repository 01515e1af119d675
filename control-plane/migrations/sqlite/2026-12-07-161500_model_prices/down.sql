ALTER TABLE provider_models DROP COLUMN price_cache_write;
ALTER TABLE provider_models DROP COLUMN price_cache_read;
ALTER TABLE provider_models DROP COLUMN price_output;
ALTER TABLE provider_models DROP COLUMN price_input;
