DROP TABLE usage_batches;
DROP TABLE usage_hourly;
