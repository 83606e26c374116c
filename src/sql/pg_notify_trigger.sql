-- prereq: notify the listeners of a key source of every key inserted into a table, whoever
-- inserts it (a plain INSERT by another service, a migration, psql).
--
-- After each inserted row, `pg_notify(channel, key::text)`: every prereq instance listening on
-- the channel wakes the messages it holds for that key. Rows skipped by ON CONFLICT DO NOTHING
-- fire nothing; prereq's own insert sends the same notification in the same transaction, and
-- PostgreSQL delivers identical notifications of one transaction once.
--
-- Needs PostgreSQL 14 or later (CREATE OR REPLACE TRIGGER). Idempotent: run it as often as you
-- like; `PgKeys::install_notify_trigger` runs it under a transaction-level advisory lock, so
-- that instances starting together do not collide.
--
-- Placeholders in double braces, filled in by prereq (`notify_trigger_sql`):
--   function      the trigger function, schema-qualified and quoted
--   trigger       the trigger's name, quoted
--   table         the table, schema-qualified and quoted
--   column        the key column, quoted
--   channel       the notification channel, as a string literal

CREATE OR REPLACE FUNCTION {{function}}() RETURNS trigger
LANGUAGE plpgsql AS $prereq$
BEGIN
    PERFORM pg_notify({{channel}}, NEW.{{column}}::text);
    RETURN NULL;
END
$prereq$;

CREATE OR REPLACE TRIGGER {{trigger}}
    AFTER INSERT ON {{table}}
    FOR EACH ROW EXECUTE FUNCTION {{function}}();
