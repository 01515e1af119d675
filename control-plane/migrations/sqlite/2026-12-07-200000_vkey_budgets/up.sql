-- Budget of a virtual key (DESIGN §18): micro-USD per period, NULL = no budget; the period is
-- 'day', 'week' or 'month' (UTC calendar periods), NULL exactly when there is no budget.
-- Existing keys get NULL: no budget until one is set.
ALTER TABLE virtual_keys ADD COLUMN budget_micro_usd BIGINT;
ALTER TABLE virtual_keys ADD COLUMN budget_period TEXT;
