-- Which server wrote the WAL relay's recorded position.
--
-- A position means something only on the server whose log it points into. A dump of the
-- database restored into another cluster brings outbox_wal_progress along; if its position
-- fell between the new slot's position and the new server's WAL end, a relay that trusted
-- it would skip every message in between. The relay now writes the server's system
-- identifier (pg_control_system()) with the position, and ignores and removes a record
-- whose identifier is another's or missing (written before this migration): it then starts
-- from the slot's own position, re-sending at most what the slot had not confirmed.
ALTER TABLE outbox_wal_progress ADD COLUMN system_identifier bigint;
