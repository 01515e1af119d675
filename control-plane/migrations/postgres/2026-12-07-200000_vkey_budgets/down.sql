ALTER TABLE virtual_keys DROP COLUMN budget_period;
ALTER TABLE virtual_keys DROP COLUMN budget_micro_usd;
