-- Statements judged by everything they can do (issue 9), run by test_corpus.py through
-- `agentgate policy explain` (policy: CORPUS_POLICY there: deny DROP, TRUNCATE, DELETE;
-- review COPY ... PROGRAM and triggers; the user "migrator" may run computed dynamic SQL)
-- and through a real PostgreSQL 15 (fixture: FIXTURE there).
--
-- Each case starts with a line
--   --@ <decision> <server> [user=NAME] [rule=NAME] : why
-- decision: what the policy decides (allow | deny | review), rule: which rule decides;
-- server, what the real server does with it (each case in a transaction rolled back):
--   harmless  it runs, and no row or table of the fixture is lost
--   destroys  it runs, and rows or tables are lost (in the shop database, or through
--             dblink in the scratch one)
--   runs      it runs (what it does is deferred: a function, a rule; or it changes rows)
--   parses    the server's grammar accepts it, it fails later (a missing language,
--             extension, server; not allowed in a transaction block)
--   rejected  the server refuses it as a syntax error (SQLSTATE 42601)
-- {dsn} is the scratch database's connection string.

--@ deny destroys rule=no-destruction : plain
DROP TABLE drop_me
--@ deny destroys : comment and odd case
/* harmless */ DrOp TaBlE drop_me
--@ deny destroys : line comment first
-- just looking
TRUNCATE orders CASCADE
--@ deny destroys : quoted name
delete from "orders" where id = 1
--@ deny destroys : unicode-escaped identifier
DROP TABLE U&"dr\006Fp_me"
--@ deny destroys : unicode escape with another escape character
DROP TABLE U&"dr!006Fp_me" UESCAPE '!'
--@ deny destroys : schema-qualified, IF EXISTS, CASCADE
DROP TABLE IF EXISTS public.drop_me CASCADE
--@ deny destroys : second statement of a multi-statement text
SELECT 1; DROP TABLE drop_me
--@ deny destroys : comment glued between statements
SELECT 1;/**/TRUNCATE TABLE ONLY orders CASCADE
--@ deny destroys : tabs and newlines
DELETE
	FROM
		orders
--@ deny destroys : comments instead of spaces
delete/**/from/**/orders
--@ deny destroys : delete in a CTE
WITH gone AS (DELETE FROM orders RETURNING *) SELECT count(*) FROM gone
--@ deny destroys : delete in a later CTE, not read
WITH a AS (SELECT 1), b AS (DELETE FROM orders WHERE id > 1 RETURNING id) SELECT * FROM a
--@ deny destroys : delete in a CTE feeding an insert
WITH d AS (DELETE FROM orders WHERE id = 1 RETURNING item) INSERT INTO delete_log(note) SELECT item FROM d
--@ deny destroys : delete in a CTE feeding an update
WITH d AS (DELETE FROM drop_me RETURNING x) UPDATE orders SET qty = qty WHERE id IN (SELECT x FROM d)
--@ deny destroys : EXPLAIN ANALYZE runs it
EXPLAIN ANALYZE DELETE FROM orders
--@ deny harmless : EXPLAIN alone doesn't run it, but is judged by what it names
EXPLAIN DELETE FROM orders
--@ deny destroys : prepared, then executed
PREPARE del(int) AS DELETE FROM orders WHERE id = $1; EXECUTE del(1)
--@ deny destroys : prepared with a CTE
PREPARE d2 AS WITH x AS (DELETE FROM orders RETURNING 1) SELECT count(*) FROM x; EXECUTE d2
--@ deny rejected rule=(unparseable) : TRUNCATE can't be prepared
PREPARE zap AS TRUNCATE orders
--@ deny destroys : COPY of a DELETE's RETURNING
COPY (DELETE FROM orders RETURNING id) TO '/dev/null'
--@ deny destroys : DELETE ... USING
DELETE FROM ONLY public.orders AS o USING staging s WHERE o.id = s.id
--@ deny destroys : DELETE with a subquery
DELETE FROM orders o WHERE o.id IN (SELECT id FROM staging)
--@ deny destroys : TRUNCATE of several tables
TRUNCATE "orders", drop_me RESTART IDENTITY
--@ deny destroys : DROP of a schema takes its tables
DROP SCHEMA public CASCADE
--@ deny runs : DROP of a function
DROP FUNCTION log_delete() CASCADE
--@ deny destroys : MERGE that deletes
MERGE INTO orders o USING staging s ON o.id = s.id WHEN MATCHED THEN DELETE
--@ deny destroys : lower case MERGE, a conditional delete among other actions
merge into orders using (select 1 as id) s on orders.id = s.id when matched and true then delete when not matched then insert (id) values (s.id)
--@ deny destroys : MERGE with a CTE
WITH src AS (SELECT 2 AS id) MERGE INTO orders o USING src ON o.id = src.id WHEN MATCHED THEN DELETE
--@ deny destroys : MERGE whose source is a subquery, delete second
MERGE INTO orders o USING (SELECT id FROM orders) s ON o.id = s.id WHEN MATCHED AND o.id > 100 THEN UPDATE SET qty = 0 WHEN MATCHED THEN DELETE
--@ allow runs : MERGE that only updates
MERGE INTO orders o USING staging s ON o.id = s.id WHEN MATCHED THEN UPDATE SET qty = s.qty
--@ allow harmless : MERGE that only inserts
MERGE INTO orders o USING staging s ON o.id = s.id WHEN NOT MATCHED THEN INSERT (id, item) VALUES (s.id + 100, s.a)
--@ allow harmless : MERGE doing nothing
MERGE INTO orders o USING staging s ON o.id = s.id WHEN MATCHED THEN DO NOTHING
--@ allow harmless : a table named like a verb, MERGE inserting into it
MERGE INTO delete_log d USING staging s ON d.id = s.id WHEN NOT MATCHED THEN INSERT (note) VALUES ('DELETE ' || s.a)
--@ deny destroys : DROP in a DO block
DO $$ BEGIN DROP TABLE drop_me; END $$
--@ deny destroys : EXECUTE of a literal
DO $$BEGIN EXECUTE 'DROP TABLE drop_me'; END$$
--@ deny destroys : EXECUTE of a variable made of literals
DO $x$ DECLARE v text := 'TRUNCATE ' || 'orders CASCADE'; BEGIN EXECUTE v; END $x$
--@ deny destroys : EXECUTE of a variable assigned a literal
DO $$ DECLARE v text; BEGIN v := 'DELETE FROM orders'; EXECUTE v; END $$
--@ deny destroys : one of several assignments is destructive
DO $$ DECLARE v text := 'SELECT 1'; BEGIN IF now() > '2000-01-01' THEN v := 'DELETE FROM orders'; END IF; EXECUTE v; END $$
--@ deny destroys : assignment with =, a variable built from another
DO $$ DECLARE a text := 'DROP '; b text; BEGIN b = a || 'TABLE drop_me'; EXECUTE b; END $$
--@ deny destroys : quoted variable name
DO $$ DECLARE "Cmd" text := 'DELETE FROM orders'; BEGIN EXECUTE "Cmd"; END $$
--@ deny destroys : variable named like a keyword
DO $$ DECLARE sql text := 'DELETE FROM orders'; BEGIN EXECUTE sql; END $$
--@ deny destroys : a block as a plain string, quotes doubled
do 'begin execute ''drop table drop_me''; end'
--@ deny destroys : a block as an escape string
DO E'BEGIN EXECUTE \'DROP TABLE drop_me\'; END'
--@ deny destroys : EXECUTE of a unicode-escaped string
DO $$ BEGIN EXECUTE U&'\0044ROP TABLE drop_me'; END $$
--@ deny destroys : EXECUTE of an escape string
DO $$ BEGIN EXECUTE E'\x44ELETE FROM orders'; END $$
--@ deny destroys : EXECUTE of a cast literal
DO $$ BEGIN EXECUTE 'TRUNCATE orders CASCADE'::text; END $$
--@ deny destroys : EXECUTE of a dollar-quoted literal
DO $$ BEGIN EXECUTE $q$DELETE FROM orders$q$; END $$
--@ deny destroys : several statements in one EXECUTE
DO $$ BEGIN EXECUTE 'SELECT 1; DELETE FROM orders'; END $$
--@ deny destroys : the loop body of FOR ... IN EXECUTE
DO LANGUAGE plpgsql $$ DECLARE r record; BEGIN FOR r IN EXECUTE 'SELECT 1' LOOP DELETE FROM orders; END LOOP; END $$
--@ deny destroys : FOR ... IN EXECUTE of a delete
DO $$ DECLARE r record; BEGIN FOR r IN EXECUTE 'DELETE FROM orders RETURNING id' LOOP NULL; END LOOP; END $$
--@ deny destroys : a cursor opened on a delete, fetched
DO $$ DECLARE c refcursor; r record; BEGIN OPEN c FOR EXECUTE 'DELETE FROM orders RETURNING id'; FETCH c INTO r; END $$
--@ deny destroys : a DO nested in an EXECUTE nested in a DO
DO $$ BEGIN EXECUTE $q$DO $i$ BEGIN EXECUTE 'DELETE FROM orders'; END $i$ $q$; END $$
--@ deny destroys : EXECUTE in an exception handler
DO $$ BEGIN PERFORM 1/0; EXCEPTION WHEN division_by_zero THEN EXECUTE 'TRUNCATE orders CASCADE'; END $$
--@ deny destroys : delete in a nested block
DO $$ BEGIN BEGIN DELETE FROM orders WHERE id = 1; END; END $$
--@ deny destroys : delete in a loop
DO $$ BEGIN FOR i IN 1..2 LOOP DELETE FROM orders WHERE id = i; END LOOP; END $$
--@ deny destroys : a delete after a PERFORM
DO $$ BEGIN PERFORM * FROM (SELECT 1) s; DELETE FROM drop_me; END $$
--@ deny destroys : function created then called in one block
DO $$ BEGIN CREATE FUNCTION pg_temp.z() RETURNS void LANGUAGE sql AS 'DELETE FROM orders'; PERFORM pg_temp.z(); END $$
--@ deny destroys rule=(unparseable) : computed with format()
DO $$ BEGIN EXECUTE format('DROP TABLE %I', 'drop_me'); END $$
--@ deny destroys rule=(unparseable) : computed from a table
DO $$ BEGIN EXECUTE 'DROP TABLE ' || (SELECT name FROM victims LIMIT 1); END $$
--@ deny destroys rule=(unparseable) : variable read from a table
DO $$ DECLARE v text; BEGIN SELECT q INTO v FROM jobs WHERE id = 2; EXECUTE v; END $$
--@ allow destroys user=migrator rule=migrator-dynamic-sql : the same, for the user allowed computed dynamic SQL
DO $$ DECLARE v text; BEGIN SELECT q INTO v FROM jobs WHERE id = 2; EXECUTE v; END $$
--@ deny destroys rule=(unparseable) : variable from a FOR loop over a table
DO $$ DECLARE v text := 'SELECT 1'; BEGIN FOR v IN SELECT q FROM jobs ORDER BY id LOOP EXECUTE v; END LOOP; END $$
--@ deny destroys rule=(unparseable) : variable written by EXECUTE ... INTO
DO $$ DECLARE v text := 'SELECT 1'; BEGIN EXECUTE 'SELECT q FROM jobs WHERE id = 2' INTO v; EXECUTE v; END $$
--@ deny destroys rule=(unparseable) : variable written by an INOUT argument of CALL
DO $$ DECLARE v text := 'SELECT 1'; BEGIN CALL setter(v); EXECUTE v; END $$
--@ deny destroys rule=(unparseable) : variable grown from itself
DO $$ DECLARE v text := 'SELECT 1'; BEGIN v := v || '; DELETE FROM orders'; EXECUTE v; END $$
--@ deny destroys rule=(unparseable) : a literal cast to a type that cuts it
DO $$ DECLARE v text := 'SELECT 1; DELETE FROM orders'; BEGIN EXECUTE v::varchar(40); END $$
--@ deny destroys rule=(unparseable) : a setting holds the SQL
DO $$ BEGIN PERFORM set_config('my.sql', 'DELETE FROM orders', true); EXECUTE current_setting('my.sql'); END $$
--@ deny destroys rule=(unparseable) : a number makes it computed
DO $$ BEGIN EXECUTE 'DELETE FROM orders WHERE id > ' || 0; END $$
--@ deny destroys rule=(unparseable) : the error message is the SQL
DO $$ BEGIN RAISE EXCEPTION 'DELETE FROM orders'; EXCEPTION WHEN others THEN EXECUTE sqlerrm; END $$
--@ allow harmless : EXECUTE of a harmless literal
DO $$ BEGIN EXECUTE 'SELECT 1'; END $$
--@ allow harmless : EXECUTE of a harmless select that mentions a drop
DO $$ BEGIN EXECUTE 'SELECT ''DROP TABLE orders'''; END $$
--@ allow harmless : EXECUTE of an insert into a table named delete_log
DO $$ DECLARE cmd text := 'INSERT INTO delete_log(note) VALUES (''truncate'')'; BEGIN EXECUTE cmd; END $$
--@ allow harmless : a variable holding destruction, never executed
DO $$ DECLARE v text := 'DROP TABLE drop_me'; BEGIN RAISE NOTICE '%', v; END $$
--@ allow harmless : RAISE of a destructive string
DO $$ BEGIN RAISE NOTICE 'DROP TABLE orders'; END $$
--@ allow harmless : PERFORM of a destructive string
DO $$ BEGIN PERFORM 'TRUNCATE orders'; END $$
--@ allow harmless : a comment in the block
DO $$ -- DROP TABLE orders
BEGIN NULL; END $$
--@ allow harmless : a block comment in the block
DO $$ BEGIN /* DELETE FROM orders */ NULL; END $$
--@ allow harmless : an insert of a destructive string
DO $$ BEGIN INSERT INTO delete_log(note) VALUES ('DELETE FROM orders'); END $$
--@ allow harmless : loops, conditions, %TYPE
DO $$ DECLARE n orders.qty%TYPE := 0; r orders%ROWTYPE; BEGIN FOR r IN SELECT * FROM orders LOOP n := n + r.qty; END LOOP; IF n < 0 THEN RAISE 'drop'; END IF; END $$
--@ allow harmless : a label named drop
DO $$ <<"drop">> DECLARE truncate int := 1; BEGIN RAISE NOTICE '%', "drop".truncate; END "drop" $$
--@ allow harmless : a dynamic harmless select from an assigned variable
DO $$ DECLARE q text; BEGIN q := 'SELECT count(*) FROM delete_log'; EXECUTE q; END $$
--@ deny harmless rule=(unparseable) : computed, even when harmless
DO $$ BEGIN EXECUTE format('SELECT %L', 'x'); END $$
--@ allow harmless user=migrator : the same, for the user allowed computed dynamic SQL
DO $$ BEGIN EXECUTE format('SELECT %L', 'x'); END $$
--@ deny parses rule=(unparseable) : another language
DO LANGUAGE plperl 'spi_exec_query("DROP TABLE orders")'
--@ deny parses rule=(unparseable) : another language, named like ours
DO LANGUAGE "PLpgSQL" $$ BEGIN DROP TABLE orders; END $$
--@ deny rejected rule=(unparseable) : a block that doesn't parse
DO $$ BEGIN DROPP TABLE orders; END $$
--@ deny rejected rule=(unparseable) : EXECUTE of text that doesn't parse
DO $$ BEGIN EXECUTE 'DROP TABEL orders'; END $$
--@ deny runs : a procedure's body
CREATE PROCEDURE purge() LANGUAGE plpgsql AS $$ BEGIN DELETE FROM orders; END $$
--@ deny runs : a SQL function's string body
CREATE FUNCTION zap() RETURNS void LANGUAGE sql AS 'DROP TABLE drop_me'
--@ deny runs : a SQL function's dollar-quoted body, language last
CREATE FUNCTION zap2() RETURNS void AS $$ SELECT 1; TRUNCATE orders CASCADE $$ LANGUAGE sql
--@ deny runs : a SQL-standard body
CREATE FUNCTION zap3() RETURNS int LANGUAGE sql BEGIN ATOMIC DELETE FROM orders WHERE id = 1; SELECT 1; END
--@ deny runs : a SQL-standard procedure body
CREATE PROCEDURE zap4(a int) LANGUAGE sql BEGIN ATOMIC DELETE FROM orders WHERE id = a; END
--@ deny runs : a replaced function
CREATE OR REPLACE FUNCTION log_delete() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN DELETE FROM orders; RETURN OLD; END $$
--@ deny runs : EXECUTE of a literal in a function
CREATE FUNCTION zap5() RETURNS SETOF int LANGUAGE plpgsql AS $$ BEGIN EXECUTE 'DROP TABLE drop_me'; RETURN QUERY SELECT 1; END $$
--@ deny runs : RETURN QUERY EXECUTE of a delete
CREATE FUNCTION zap6() RETURNS SETOF int LANGUAGE plpgsql AS $$ BEGIN RETURN QUERY EXECUTE 'WITH d AS (DELETE FROM orders RETURNING id) SELECT id FROM d'; END $$
--@ deny runs : dblink in a SQL function
CREATE FUNCTION zap7() RETURNS void LANGUAGE sql AS $$ SELECT dblink_exec('{dsn}', 'DROP TABLE drop_me') $$
--@ deny runs : a function in a schema, mixed case
Create Function public.ZAP8() Returns Void Language PLPGSQL As $body$ Begin Truncate Orders Cascade; End $body$
--@ deny runs rule=(unparseable) : a function running its parameter
CREATE FUNCTION run(q text) RETURNS void LANGUAGE plpgsql AS $$ BEGIN EXECUTE q; END $$
--@ allow runs user=migrator : the same, for the user allowed computed dynamic SQL
CREATE FUNCTION run(q text) RETURNS void LANGUAGE plpgsql AS $$ BEGIN EXECUTE q; END $$
--@ deny runs rule=(unparseable) : a SQL function running its parameter through dblink
CREATE FUNCTION run2(q text) RETURNS void LANGUAGE sql AS $$ SELECT dblink_exec('{dsn}', q) $$
--@ deny parses rule=(unparseable) : another language
CREATE FUNCTION py() RETURNS void LANGUAGE plpython3u AS $$ plpy.execute("DROP TABLE orders") $$
--@ deny parses rule=(unparseable) : C
CREATE FUNCTION cf(int) RETURNS int AS 'no_such_library', 'cf' LANGUAGE c
--@ deny parses rule=(unparseable) : a language name that isn't PL/pgSQL to the server
CREATE FUNCTION f() RETURNS int LANGUAGE 'PLpgSQL' AS 'BEGIN DELETE FROM orders; RETURN 1; END'
--@ deny rejected rule=(unparseable) : a body that doesn't parse
CREATE FUNCTION bad() RETURNS void LANGUAGE sql AS 'DROP TABEL orders'
--@ allow harmless : a SQL function that counts
CREATE FUNCTION n_orders() RETURNS bigint LANGUAGE sql RETURN (SELECT count(*) FROM orders)
--@ allow harmless : a function named drop
CREATE FUNCTION "drop"() RETURNS text LANGUAGE sql AS $$ SELECT 'drop table' $$
--@ allow harmless : a trigger function that checks for deletes
CREATE FUNCTION audit() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN IF TG_OP = 'DELETE' THEN INSERT INTO delete_log(note) VALUES (OLD.id::text); RETURN OLD; END IF; NEW.qty := coalesce(NEW.qty, 0); RETURN NEW; END $$
--@ allow harmless : a logging function
CREATE OR REPLACE FUNCTION log_it(msg text) RETURNS void LANGUAGE plpgsql AS $$ BEGIN INSERT INTO delete_log(note) VALUES (msg); END $$
--@ allow harmless : a set-returning function
CREATE FUNCTION items(min_qty int) RETURNS TABLE (id int, item text) LANGUAGE plpgsql STABLE AS $fn$ BEGIN RETURN QUERY SELECT o.id, o.item FROM orders o WHERE o.qty >= min_qty; END $fn$
--@ allow harmless : a function whose comment says drop
CREATE FUNCTION f2() RETURNS int LANGUAGE plpgsql AS $$ BEGIN -- DROP TABLE orders
RETURN 1; END $$
--@ deny runs : a rule whose action deletes
CREATE RULE r1 AS ON INSERT TO delete_log DO ALSO DELETE FROM orders
--@ deny runs : a rule whose actions delete, among others
CREATE OR REPLACE RULE r2 AS ON UPDATE TO staging DO INSTEAD (INSERT INTO delete_log(note) VALUES ('x'); DELETE FROM orders WHERE id = OLD.id)
--@ allow harmless : a rule doing nothing
CREATE RULE r3 AS ON UPDATE TO orders DO INSTEAD NOTHING
--@ review runs rule=triggers-need-a-human : a trigger runs a function later
CREATE TRIGGER tr BEFORE DELETE ON orders FOR EACH ROW EXECUTE FUNCTION log_delete()
--@ review destroys rule=triggers-need-a-human : a trigger on an existing function that deletes, then fired
CREATE TRIGGER tr2 AFTER INSERT ON delete_log EXECUTE FUNCTION purge_all(); INSERT INTO delete_log(note) VALUES ('x')
--@ review runs rule=triggers-need-a-human : an event trigger
CREATE EVENT TRIGGER et ON ddl_command_start EXECUTE FUNCTION do_nothing()
--@ deny runs : a view whose query deletes through dblink
CREATE VIEW v_zap AS SELECT dblink_exec('{dsn}', 'DELETE FROM orders') AS r
--@ deny runs : a default that deletes through dblink
CREATE TABLE t_zap (a text DEFAULT dblink_exec('{dsn}', 'DELETE FROM orders'))
--@ deny runs : a check constraint that drops through dblink
CREATE TABLE t_zap2 (a int CHECK (dblink_exec('{dsn}', 'DROP TABLE drop_me') IS NOT NULL))
--@ deny parses : a generated column that truncates through dblink (the server wants it immutable)
CREATE TABLE t_zap3 (a int, b text GENERATED ALWAYS AS (dblink_exec('{dsn}', 'TRUNCATE orders CASCADE')) STORED)
--@ deny runs : a policy whose expression deletes through dblink
CREATE POLICY p_zap ON orders USING (dblink_exec('{dsn}', 'DELETE FROM orders') IS NOT NULL)
--@ deny destroys : dblink_exec of a literal
SELECT dblink_exec('{dsn}', 'DROP TABLE drop_me')
--@ deny destroys : dblink returning rows of a delete
SELECT * FROM dblink('{dsn}', 'DELETE FROM orders RETURNING id') AS r(id int)
--@ deny destroys : dblink_exec of a dollar-quoted literal
SELECT dblink_exec('{dsn}', $$TRUNCATE orders CASCADE$$)
--@ deny destroys : upper case, escape string
select DBLINK_EXEC('{dsn}', E'DELETE\x20FROM orders')
--@ deny destroys : schema-qualified dblink
SELECT public.dblink_exec('{dsn}', 'DELETE FROM orders')
--@ deny destroys : literals joined
SELECT dblink_exec('{dsn}', 'DROP ' || 'TABLE ' || 'drop_me')
--@ deny destroys : dblink in a PL/pgSQL variable
DO $$ DECLARE v text := 'DROP TABLE drop_me'; BEGIN PERFORM dblink_exec('{dsn}', v); END $$
--@ deny destroys : dblink in a CTE
WITH x AS (SELECT dblink_exec('{dsn}', 'DELETE FROM orders') AS r) SELECT * FROM x
--@ deny destroys : dblink in a scalar subquery in a WHERE
SELECT 1 WHERE (SELECT dblink_exec('{dsn}', 'DELETE FROM orders')) IS NOT NULL
--@ deny destroys : dblink in a prepared statement
PREPARE dl AS SELECT dblink_exec('{dsn}', 'TRUNCATE orders CASCADE'); EXECUTE dl
--@ deny destroys : dblink running a DO
SELECT dblink_exec('{dsn}', 'DO $d$ BEGIN EXECUTE ''DROP TABLE drop_me''; END $d$')
--@ deny destroys user=migrator rule=no-destruction : a known drop is denied for the dynamic-SQL user too
SELECT dblink_exec('{dsn}', 'DROP TABLE drop_me')
--@ deny destroys rule=(unparseable) : dblink of text computed from a column
SELECT dblink_exec('{dsn}', 'DROP TABLE ' || name) FROM victims
--@ allow destroys user=migrator rule=migrator-dynamic-sql : the same, for the user allowed computed dynamic SQL
SELECT dblink_exec('{dsn}', 'DROP TABLE ' || name) FROM victims
--@ deny destroys rule=(unparseable) : dblink of text computed by format()
SELECT dblink_exec('{dsn}', format('DELETE FROM %I', 'orders'))
--@ deny parses : dblink_send_query of a literal
SELECT dblink_send_query('no_such_connection', 'DROP TABLE drop_me')
--@ deny parses : dblink_open of a delete
SELECT dblink_open('no_such_connection', 'cur', 'WITH d AS (DELETE FROM orders RETURNING id) SELECT id FROM d')
--@ deny parses : query_to_xml of a delete
SELECT query_to_xml('WITH d AS (DELETE FROM orders RETURNING id) SELECT id FROM d', true, true, '')
--@ deny parses : pg_cron schedules SQL for later
SELECT cron.schedule('* * * * *', 'TRUNCATE orders')
--@ allow harmless : dblink of a select
SELECT * FROM dblink('{dsn}', 'SELECT item FROM orders') AS r(item text)
--@ allow harmless : dblink of an insert with a destructive string
SELECT dblink_exec('{dsn}', 'INSERT INTO delete_log(note) VALUES (''DROP TABLE orders'')')
--@ allow harmless : query_to_xml of a select
SELECT query_to_xml('SELECT item FROM orders', true, true, '')
--@ allow harmless : table_to_xml of a table
SELECT table_to_xml('orders', true, true, '')
--@ deny harmless rule=(unparseable) : database_to_xml reads tables it chooses itself
SELECT database_to_xml(true, true, '')
--@ allow harmless : crosstab of two selects
SELECT * FROM crosstab('SELECT id, item, qty FROM orders ORDER BY 1', 'SELECT DISTINCT item FROM orders ORDER BY 1') AS ct(id int, a int, b int, c int)
--@ allow harmless : ts_stat of a select
SELECT * FROM ts_stat('SELECT to_tsvector(item) FROM orders')
--@ allow harmless : builds a DELETE's text, runs nothing
SELECT dblink_build_sql_delete('orders', '1', 1, '{1}')
--@ allow harmless : format() builds text, runs nothing
SELECT format('DROP TABLE %I', 'orders')
--@ review harmless rule=programs-need-a-human : COPY to a program
COPY orders TO PROGRAM 'cat > /dev/null'
--@ review harmless rule=programs-need-a-human : COPY of a query to a program
COPY (SELECT 'DROP TABLE orders') TO PROGRAM 'cat > /dev/null'
--@ review parses rule=programs-need-a-human : a foreign table reading a program's output
CREATE FOREIGN TABLE ft (a text) SERVER no_such_server OPTIONS (program 'rm -rf /tmp/x')
--@ review parses rule=programs-need-a-human : a setting that runs a program
ALTER SYSTEM SET archive_command = 'rm -rf /tmp/x'
--@ deny rejected rule=(unparseable) : a misspelling
DROP TABEL orders
--@ deny rejected rule=(unparseable) : not SQL
SELEC 1
--@ allow harmless : a string
SELECT 'DROP TABLE orders'
--@ allow harmless : a string with a column alias named like a verb
SELECT 'delete from orders' AS "truncate"
--@ allow harmless : a dollar-quoted string
SELECT $$DROP TABLE orders$$
--@ allow harmless : a tagged dollar-quoted string with several statements
SELECT $tag$ TRUNCATE orders; DELETE FROM orders $tag$
--@ allow harmless : an escape string
SELECT E'\x44ROP TABLE orders'
--@ allow harmless : a unicode-escaped string
SELECT U&'\0044ROP TABLE orders'
--@ allow harmless : a block comment
/* DROP TABLE orders */ SELECT 1
--@ allow harmless : a line comment after the statement
SELECT 1 -- ; DROP TABLE orders
--@ allow harmless : a nested block comment
SELECT /* outer /* DROP TABLE orders; */ still comment */ 1
--@ allow harmless : a column named drop
SELECT "drop" FROM orders
--@ allow harmless : a table named delete_log
SELECT * FROM delete_log
--@ allow harmless : an insert of a destructive string
INSERT INTO delete_log (note) VALUES ('TRUNCATE orders')
--@ allow harmless : a table named delete
SELECT "delete".x FROM "delete"
--@ allow harmless : a unicode-escaped column name
SELECT U&"dr\006Fp" FROM orders
--@ allow runs : an update setting a column named drop to a destructive string
UPDATE orders SET "drop" = 'DROP TABLE x' WHERE id = 1
--@ allow harmless : an alias named like a verb
SELECT count(*) AS drop_count, max(item) AS "DELETE" FROM orders
--@ allow harmless : a temporary copy
CREATE TEMP TABLE drop_candidates AS SELECT * FROM orders
--@ allow harmless : SELECT INTO a new table
SELECT * INTO orders_copy FROM orders
--@ allow harmless : a comment on a table
COMMENT ON TABLE orders IS 'never DROP this table'
--@ allow harmless : a cast of a destructive string
SELECT pg_typeof('TRUNCATE'::text)
--@ allow harmless : EXPLAIN of a select
EXPLAIN SELECT * FROM orders WHERE item = 'DELETE'
--@ allow harmless : a prepared select of a destructive string
PREPARE p1 AS SELECT 'DROP TABLE orders'; EXECUTE p1
--@ allow harmless : a prepared select with a parameter
PREPARE p2(text) AS SELECT * FROM orders WHERE item = $1; EXECUTE p2('DELETE')
--@ allow harmless : LIKE of a verb
SELECT * FROM orders WHERE item LIKE '%drop%'
--@ allow harmless : full text of verbs
SELECT to_tsvector('drop table truncate delete')
--@ allow harmless : a notification carrying a destructive string
NOTIFY delete_log, 'DROP TABLE orders'
--@ allow harmless : LISTEN on a channel named like a statement
LISTEN "drop table"
--@ allow harmless : a setting holding a destructive string
SET application_name = 'DROP TABLE orders'
--@ allow harmless : SHOW
SHOW search_path
--@ allow harmless : quote_ident of a verb
SELECT quote_ident('drop')
--@ allow harmless : VALUES of verbs
VALUES ('DELETE'), ('TRUNCATE')
--@ allow harmless : column aliases named like verbs
SELECT * FROM (VALUES (1, 'drop')) AS v("delete", "truncate")
--@ allow harmless : a view of a column named drop
CREATE VIEW drop_view AS SELECT "drop" FROM orders
--@ allow harmless : a CTE named delete
WITH "delete" AS (SELECT 1 AS "drop") SELECT "drop" FROM "delete"
--@ allow harmless : aliases in capitals
SELECT 1 AS "TRUNCATE", 2 AS "DROP"
--@ allow harmless : a setting read
SELECT current_setting('server_version')
--@ allow harmless : TABLE
TABLE orders
--@ allow harmless : row locks
SELECT * FROM orders WHERE id = 1 FOR UPDATE
--@ allow harmless : a join and a window
SELECT o.item, sum(s.qty) OVER (PARTITION BY o.item) FROM orders o JOIN staging s USING (id)
--@ allow harmless : a recursive CTE
WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 5) SELECT sum(i) FROM n
--@ allow harmless : an insert with a CTE reading
WITH s AS (SELECT a FROM staging) INSERT INTO delete_log(note) SELECT a FROM s
--@ allow harmless : an upsert
INSERT INTO orders (id, item) VALUES (50, 'drop') ON CONFLICT (id) DO NOTHING
--@ allow harmless : a sequence
CREATE SEQUENCE delete_seq
--@ allow harmless : an index
CREATE INDEX orders_drop_idx ON orders ("drop")
--@ allow harmless : an aggregate made of an existing function
CREATE AGGREGATE drop_sum(int) (sfunc = int4pl, stype = int)
--@ allow harmless : a domain with a check mentioning delete
CREATE DOMAIN verb AS text CHECK (VALUE <> 'DELETE')
--@ allow harmless : a type with a field named truncate
CREATE TYPE pair AS ("drop" int, "truncate" text)
--@ allow harmless : a schema named truncate
CREATE SCHEMA "truncate"
--@ allow harmless : a grant
GRANT SELECT ON delete_log TO app
--@ allow harmless : a table with a column named delete
CREATE TABLE t_ok ("delete" boolean DEFAULT false, drop_at timestamptz)
--@ allow harmless : ALTER setting a default that names a verb
ALTER TABLE staging ALTER COLUMN a SET DEFAULT 'DROP'
--@ allow harmless : a savepoint-free select of a function named like a verb
SELECT pg_catalog.lower('DROP')
--@ allow harmless : a CALL of a harmless procedure
CALL do_nothing_proc()
--@ allow harmless : EXECUTE of a literal in a function that mentions delete
CREATE FUNCTION f3() RETURNS void LANGUAGE plpgsql AS $$ BEGIN EXECUTE 'INSERT INTO delete_log(note) VALUES (''delete'')'; END $$
--@ allow harmless : a DO with an EXECUTE USING a destructive parameter value
DO $$ BEGIN EXECUTE 'INSERT INTO delete_log(note) VALUES ($1)' USING 'DROP TABLE orders'; END $$
--@ allow harmless : a string with an embedded quote and a semicolon
SELECT 'it''s fine; DROP TABLE orders'
--@ allow harmless : a dollar quote containing another tag
SELECT $a$ $b$ DROP TABLE orders $b$ $a$
--@ allow harmless : an identifier containing a semicolon and a verb
SELECT 1 AS "x; DROP TABLE orders"
--@ allow harmless : an update with no WHERE that changes nothing
UPDATE orders SET qty = qty
--@ allow destroys : known limit: code already on the server is not in the text (README)
CALL purge_proc()
--@ deny runs rule=(unparseable) : an operator || of one's own changes what literals joined with || run
CREATE OPERATOR public.|| (leftarg = text, rightarg = text, function = textcat)
--@ deny harmless rule=(unparseable) : backslashes would escape quotes in later texts
SET standard_conforming_strings = off
--@ deny harmless rule=(unparseable) : the same through set_config
SELECT set_config('standard_conforming_strings', 'off', true)
--@ deny harmless rule=(unparseable) : an encoding whose characters can hide a backslash
SELECT set_config('client_encoding', 'SJIS', true)
--@ allow harmless : UTF-8 is what the proxy reads
SET client_encoding = 'UTF8'
--@ allow harmless : read with standard strings, as the proxy keeps them: two strings
SELECT '\' , ' ; DROP TABLE drop_me; -- '
--@ deny destroys rule=(unparseable) : pg_settings turns standard_conforming_strings off for one EXECUTE (red team)
DO $$ BEGIN UPDATE pg_settings SET setting = 'off' WHERE name = 'standard_conforming_strings'; EXECUTE $q$SELECT 'x\''; DROP TABLE drop_me; --'$q$; UPDATE pg_settings SET setting = 'on' WHERE name = 'standard_conforming_strings'; END $$
--@ deny runs rule=(unparseable) : an aggregate whose state function is set_config (red team)
CREATE AGGREGATE scs_agg(text, bool) (sfunc = set_config, stype = text, initcond = 'standard_conforming_strings')
--@ deny runs rule=no-destruction : large objects unlinked by a SELECT (red team)
SELECT lo_unlink(oid) FROM pg_largeobject_metadata
--@ deny destroys rule=no-destruction : a column dropped by ALTER TABLE (red team)
ALTER TABLE orders DROP COLUMN item
--@ allow runs : a column added by ALTER TABLE (the rows change shape, nothing is lost)
ALTER TABLE orders ADD COLUMN note text
