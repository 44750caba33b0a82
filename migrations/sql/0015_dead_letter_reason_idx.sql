-- The console's overview counts waiting dead letters by consumer and reason. Without an
-- index that is a scan of the whole table (seconds at a million letters); with this one it
-- skips from one (consumer, reason) to the next and counts each up to a cap
-- (`dlq::store::dead_by_reason`).
CREATE INDEX dead_letter_dead_reason_idx ON dead_letter (consumer, reason) WHERE status = 'dead';
