"""Masks follow what the server says a column is (catalog.py), through the layer's
contract: the catalog read on a side connection, results held until it is known, errors
and notices withheld while masked columns are read, masked values kept from leaving any
other way."""
import re

import pytest

from hostagent.masking import Masker, MaskRule
from hostagent.policy import Decision, Policy, decide
from hostagent.protocols import (Answer, Close, DataReceived, OpenSide, SideAnswered, Start,
                                 ToClient, ToUpstream)
from hostagent.protocols.postgres import messages as m
from hostagent.protocols.postgres.catalog import (CATALOG_SQL, Catalog, CatalogCache,
                                                  CatalogFetch, Relation, build)
from hostagent.protocols.postgres.layer import PostgresLayer
from tests.hostagent.protocols.playbook import (CLIENT, UPSTREAM, Playbook, feed, record,
                                                to_client)

from .test_layer import SECRET, ready_layer

PEOPLE, DECOY, VIEW, VIEW2, CLEAN_VIEW = 100, 200, 300, 400, 500


def catalog(generation: int = 0) -> Catalog:
    return Catalog(
        relations={PEOPLE: Relation("public", "people", "r", ("id", "name", "ssn")),
                   DECOY: Relation("public", "decoy", "r", ("ssn",)),
                   VIEW: Relation("public", "pv", "v", ("id", "tax")),
                   VIEW2: Relation("public", "pv2", "v", ("tax",)),
                   CLEAN_VIEW: Relation("public", "pn", "v", ("id", "name")),
                   950: Relation("public", "orders", "r", ("id", "item"))},
        view_reads={VIEW: frozenset({(PEOPLE, 1), (PEOPLE, 3)}), VIEW2: frozenset({(VIEW, 2)}),
                    CLEAN_VIEW: frozenset({(PEOPLE, 1), (PEOPLE, 2)})},
        user_functions=frozenset({"stash"}), generation=generation)


def masker(columns=("people.ssn",)) -> Masker:
    return Masker((MaskRule("pii", columns=columns),))


def test_columns_and_views_over_them_are_masked_exactly():
    masked = catalog().masked(masker())
    assert masked.rule(PEOPLE, 3) == "pii"
    assert masked.rule(PEOPLE, 2) is None and masked.rule(DECOY, 1) is None
    assert masked.rule(VIEW, 1) == "pii"      # a view reading ssn: all of it
    assert masked.rule(VIEW2, 1) == "pii"     # a view over that view
    assert masked.rule(CLEAN_VIEW, 2) is None
    # schema-qualified rules match too
    assert catalog().masked(masker(("public.people.ssn",))).rule(PEOPLE, 3) == "pii"


def test_a_catalog_is_built_from_the_servers_text_rows():
    cat = build([[[b"100", b"r", b"public", b"people", b"1", b"id"],
                  [b"100", b"r", b"public", b"people", b"3", b"ssn"]],
                 [[b"300", b"100", b"3"]], [[b"stash"]], [[b"private, public"]],
                 [[b"301"]], [[b"100", b"200"]]], generation=4)
    assert cat.relations[PEOPLE].columns == ("id", "", "ssn")   # attnum 2 was dropped
    assert cat.knows(PEOPLE, 3) and not cat.knows(PEOPLE, 2) and not cat.knows(PEOPLE, 4)
    assert cat.view_reads == {300: frozenset({(100, 3)})} and cat.user_functions == {"stash"}
    assert cat.search_path == "private, public"
    assert cat.view_calls == {301} and cat.parents == {100: {200}}
    with pytest.raises(ValueError):
        build([[]], 0)


def catalog_layer(cache: CatalogCache | None = None, columns=("people.ssn",),
                  policy: Policy | None = None) -> PostgresLayer:
    """A layer with masks and injected credentials; its read-ahead OpenSide is answered."""
    cache = cache if cache is not None else CatalogCache()
    layer = PostgresLayer(decide=lambda r: decide(policy or Policy(), r), target="t", user="app", password="pw", masker=masker(columns),
        catalogs=cache)
    layer.handle(Start(("10.0.0.1", 5432)))
    feed(layer, CLIENT, m.startup_message({"user": "x", "database": "shop"}))
    out = feed(layer, UPSTREAM, m.authentication(m.AUTH_OK) + m.ready_for_query())
    sides = [c for c in out if isinstance(c, OpenSide)]
    if cache.get("shop") is None:
        # the session starts (ReadyForQuery) once the catalog is known
        assert len(sides) == 1 and m.ready_for_query() not in to_client(out), out
        out = layer.handle(SideAnswered(sides[0].key, catalog(cache.generation)))
    else:
        assert not sides
    assert to_client(out).endswith(m.ready_for_query())
    return layer


def rows(layer, cols: list[tuple[str, int, int]], values: list[bytes]) -> list:
    return feed(layer, UPSTREAM, m.row_description(
        [m.Column(n, oid, num, 25, -1, -1, 0) for n, oid, num in cols])
        + m.data_row(values) + m.frame(b"C", b"SELECT 1\0") + m.ready_for_query())


def query(layer, sql: str) -> list:
    return feed(layer, CLIENT, m.frame(b"Q", sql.encode() + b"\0"))


def test_aliases_and_joins_mask_the_masked_column_and_only_it():
    layer = catalog_layer()
    query(layer, "SELECT p.ssn AS id, d.ssn, p.name FROM people p JOIN decoy d ON true")
    sent = to_client(rows(layer, [("id", PEOPLE, 3), ("ssn", DECOY, 1), ("name", PEOPLE, 2)],
                          [SECRET, b"not-secret", b"bob"]))
    assert SECRET not in sent and b"not-secret" in sent and b"bob" in sent


def test_a_view_over_a_masked_column_is_masked():
    layer = catalog_layer()
    for oid in (VIEW, VIEW2):
        query(layer, "SELECT tax FROM pv")
        assert SECRET not in to_client(rows(layer, [("tax", oid, 1 if oid == VIEW2 else 2)],
                                            [SECRET]))
    query(layer, "SELECT name FROM pn")
    assert b"bob" in to_client(rows(layer, [("name", CLEAN_VIEW, 2)], [b"bob"]))


def test_a_result_from_an_unknown_relation_waits_for_the_catalog():
    cache = CatalogCache()
    # the column is called `secret` in the statement: only the catalog says it is ssn
    layer = catalog_layer(cache, columns=("people.ssn", "fresh.ssn"))
    query(layer, "SELECT secret FROM fresh")
    out = rows(layer, [("secret", 900, 1)], [SECRET])
    assert [type(c) for c in out] == [OpenSide] and layer.buffered() > 0   # held
    fresh = catalog(cache.generation)
    fresh.relations[900] = Relation("public", "fresh", "r", ("ssn",))
    out = layer.handle(SideAnswered(0, fresh))
    sent = to_client(out)
    assert b"****" in sent and SECRET not in sent and b"SELECT 1" in sent
    assert layer.buffered() == 0 and cache.get("shop") is fresh


def test_a_relation_even_a_fresh_read_does_not_know_is_not_asked_again():
    layer = catalog_layer()
    query(layer, "SELECT a FROM uncommitted")
    out = rows(layer, [("a", 901, 1)], [b"v"])
    assert isinstance(out[0], OpenSide)
    assert b"v" in to_client(layer.handle(SideAnswered(0, catalog())))
    query(layer, "SELECT a FROM uncommitted")
    assert not any(isinstance(c, OpenSide) for c in rows(layer, [("a", 901, 1)], [b"v"]))


def test_when_the_catalog_cannot_be_read_every_column_is_masked_and_it_is_recorded():
    cache = CatalogCache()
    layer = PostgresLayer(decide=lambda r: decide(Policy(), r), target="t", user="app", password="pw", masker=masker(), catalogs=cache)
    layer.handle(Start(("10.0.0.1", 5432)))
    feed(layer, CLIENT, m.startup_message({"user": "x", "database": "shop"}))
    feed(layer, UPSTREAM, m.authentication(m.AUTH_OK) + m.ready_for_query())
    assert (Playbook(layer) >> SideAnswered(0, None, "side connection failed: refused")
            << record("catalog", error="side connection failed: refused")
            << ToClient(m.ready_for_query()))
    # (an agent can make the read fail: ALTER DATABASE ... CONNECTION LIMIT 1): nothing
    # is proven clean, so nothing passes
    query(layer, "SELECT tax, name FROM tax_view, people")
    out = rows(layer, [("tax", VIEW, 2), ("name", PEOPLE, 2)], [SECRET, b"bob"])
    assert SECRET not in to_client(out) and b"bob" not in to_client(out)
    assert not any(isinstance(c, OpenSide) for c in out)


def test_ddl_through_the_proxy_makes_the_catalog_be_read_again():
    cache = CatalogCache()
    layer = catalog_layer(cache)
    query(layer, "ALTER TABLE decoy RENAME COLUMN ssn TO code")
    feed(layer, UPSTREAM, m.frame(b"C", b"ALTER TABLE\0") + m.ready_for_query())
    assert cache.generation == 1 and cache.get("shop") is None
    query(layer, "SELECT code FROM decoy")
    assert isinstance(rows(layer, [("code", DECOY, 1)], [b"x"])[0], OpenSide)


def test_another_session_of_the_target_uses_the_shared_snapshot():
    cache = CatalogCache()
    catalog_layer(cache)
    layer = catalog_layer(cache)   # no read ahead: asserted inside
    query(layer, "SELECT ssn AS x FROM people")
    assert SECRET not in to_client(rows(layer, [("x", PEOPLE, 3)], [SECRET]))


def test_without_injected_credentials_no_side_connection_is_opened():
    layer = PostgresLayer(decide=lambda r: decide(Policy(), r), target="t", masker=masker(), catalogs=CatalogCache())
    layer.handle(Start(("10.0.0.1", 5432)))
    feed(layer, CLIENT, m.startup_message({"user": "x", "database": "shop"}))
    out = feed(layer, UPSTREAM, m.authentication(m.AUTH_OK) + m.ready_for_query())
    assert not any(isinstance(c, OpenSide) for c in out)


# ------------------------------------------------------------------ errors and notices

QUOTING_ERROR = m.error_response(f'invalid input syntax for type integer: "{SECRET.decode()}"',
                                 "22P02")


def test_errors_of_a_statement_reading_masked_columns_are_withheld():
    layer = catalog_layer()
    query(layer, "SELECT ssn::int FROM people")
    out = feed(layer, UPSTREAM, QUOTING_ERROR + m.ready_for_query())
    sent = to_client(out)
    assert SECRET not in sent and b"withheld" in sent and b"22P02" in sent
    assert SECRET.decode() not in repr([c for c in out if not isinstance(c, ToClient)])
    # a statement that reads nothing masked keeps its message
    query(layer, "SELECT name::int FROM people")
    sent = to_client(feed(layer, UPSTREAM, m.error_response(
        'invalid input syntax for type integer: "bob"', "22P02") + m.ready_for_query()))
    assert b'"bob"' in sent


def test_notices_from_a_block_are_withheld_while_masked_columns_are_read():
    layer = catalog_layer()
    query(layer, "DO $$DECLARE r record; BEGIN FOR r IN SELECT ssn FROM people LOOP "
                 "RAISE NOTICE '%', r.ssn; END LOOP; END$$")
    sent = to_client(feed(layer, UPSTREAM, m.notice_response(SECRET.decode())
                          + m.frame(b"C", b"DO\0") + m.ready_for_query()))
    assert SECRET not in sent and b"withheld" in sent


def test_an_extended_execute_reading_masked_columns_has_its_error_withheld():
    layer = catalog_layer()
    feed(layer, CLIENT, m.frame(b"P", b"\0SELECT ssn::int FROM people\0\0\0")
         + m.frame(b"B", b"\0\0\0\0\0\0\0\0") + m.frame(b"E", b"\0\0\0\0\0") + m.frame(b"S"))
    sent = to_client(feed(layer, UPSTREAM, m.frame(b"1") + m.frame(b"2") + QUOTING_ERROR
                          + m.ready_for_query()))
    assert SECRET not in sent and b"withheld" in sent


# ------------------------------------------------------------------ no other way out

@pytest.mark.parametrize("sql", [
    "INSERT INTO decoy SELECT ssn FROM people",
    "CREATE TABLE stash AS SELECT ssn AS x FROM people",
    "UPDATE people SET name = ssn",
    "CREATE VIEW leak AS SELECT ssn AS x FROM people",
    "SELECT pg_notify('c', ssn) FROM people",
    "SELECT set_config('my.v', ssn, false) FROM people",
    "SELECT stash(ssn) FROM people",                   # a function of the database's own
    "MERGE INTO decoy d USING people p ON false WHEN NOT MATCHED THEN INSERT VALUES (p.ssn)",
    "COPY (SELECT ssn FROM people) TO STDOUT",
    "SELECT ssn INTO stash FROM people",
    "DO $$DECLARE r record; BEGIN FOR r IN SELECT * FROM people LOOP "
    "INSERT INTO decoy VALUES (r.ssn); END LOOP; END$$",              # inside a block
    "CREATE FUNCTION leak() RETURNS text LANGUAGE sql AS 'SELECT ssn FROM people LIMIT 1'",
    "CREATE TRIGGER t AFTER INSERT ON people FOR EACH ROW EXECUTE FUNCTION stash()",
    "DO $$BEGIN EXECUTE format('INSERT INTO decoy SELECT %I FROM people', 'ssn'); END$$",
    # whole rows in code: no column named, the row carries it
    "DO $$DECLARE r record; BEGIN SELECT * INTO r FROM people; "
    "PERFORM set_config('x.y', r::text, false); END$$",
    "CREATE FUNCTION h6() RETURNS text LANGUAGE sql AS 'SELECT p::text FROM people p'",
    # out of the masks' names
    "ALTER TABLE people RENAME COLUMN ssn TO s2",
    "ALTER TABLE people RENAME TO folks",
    "ALTER TABLE people INHERIT decoy",
    # planner statistics quote values
    "SELECT histogram_bounds FROM pg_stats WHERE attname = 'ssn'",
    "SELECT most_common_vals FROM pg_catalog.pg_stats",
    # a table's columns under names of the agent's choosing
    "INSERT INTO decoy SELECT c FROM people AS x(a, b, c)",
    "SELECT set_config('application_name', c, false) FROM people x(a, b, c)",
    # functions called where no call is written
    "CREATE OPERATOR ### (RIGHTARG = text, FUNCTION = keep)",
    "CREATE DOMAIN dd AS text CHECK (keep(VALUE) = 'x')",
    "CREATE CAST (people AS int) WITH FUNCTION keeprow(people)",
    # large objects and sequences keep what they are given
    "SELECT lo_truncate(lo_open(lo_creat(-1), 131072), replace(ssn, '-', '')::int) "
    "FROM people",
    "SELECT count(nextval('sq')) FROM people, generate_series(1, substr(ssn, 1, 1)::int)",
])
def test_masked_values_may_not_be_copied_where_masks_do_not_reach(sql):
    layer = catalog_layer(columns=("*.ssn",))
    out = query(layer, sql)
    assert any(isinstance(c, type(out[0])) and getattr(c, "kind", "") == "decision"
               and c.fields["action"] == "deny" and c.fields["rule"] == "(masking)"
               for c in out), out
    assert b"agentgate_denied_" in b"".join(bytes(c.data) for c in out
                                            if isinstance(c, ToUpstream)), sql


@pytest.mark.parametrize("sql", ["SELECT ssn FROM people", "SELECT name FROM people",
                                 "INSERT INTO decoy VALUES ('x')",
                                 "ALTER TABLE orders ADD COLUMN note text",
                                 "DO $$BEGIN PERFORM 1 FROM orders; END$$",
                                 "UPDATE people SET name = 'x' WHERE id = 1",
                                 "SELECT pg_notify('c', name) FROM people"])
def test_reads_and_writes_without_masked_values_go_on(sql):
    layer = catalog_layer(columns=("*.ssn",))
    out = query(layer, sql)
    assert not any(getattr(c, "kind", "") == "decision" and c.fields["action"] == "deny"
                   or getattr(c, "kind", "") == "command"
                   and c.fields["decision"]["action"] == "deny" for c in out), out


# ------------------------------------------------------------------ the side connection

def _allow(_req) -> Decision:
    return Decision("allow", "x", "")


def test_the_side_connection_logs_in_reads_and_answers():
    twin = PostgresLayer(decide=_allow, target="t", user="app", password="pw")
    fetch = CatalogFetch(twin, "app", "shop", generation=3)
    out = fetch.handle(Start(("10.0.0.1", 5432)))
    assert m.startup_message({"user": "app", "database": "shop",
                              "application_name": "agentgate catalog"}) in b"".join(
        c.data for c in out if isinstance(c, ToUpstream))
    out = fetch.handle(DataReceived(UPSTREAM, m.authentication(m.AUTH_OK)
                                    + m.ready_for_query()))
    assert CATALOG_SQL.encode() in b"".join(c.data for c in out if isinstance(c, ToUpstream))
    result = b""
    for cols, values in (((b"oid", b"relkind", b"nspname", b"relname", b"attnum", b"attname"),
                          [b"100", b"r", b"public", b"people", b"3", b"ssn"]),
                         ((b"ev_class", b"refobjid", b"refobjsubid"), None),
                         ((b"proname",), [b"stash"]), ((b"reset_val",), [b"public"]),
                         ((b"ev_class",), None), ((b"inhrelid", b"inhparent"), None)):
        result += m.row_description([m.Column(c.decode(), 0, 0, 25, -1, -1, 0) for c in cols])
        if values:
            result += m.data_row(values)
        result += m.frame(b"C", b"SELECT 1\0")
    out = fetch.handle(DataReceived(UPSTREAM, result + m.ready_for_query()))
    answer = next(c.value for c in out if isinstance(c, Answer))
    assert answer.relations[PEOPLE].columns == ("", "", "ssn") and answer.generation == 3
    assert isinstance(out[-1], Close)


def test_a_catalog_query_error_ends_the_side_connection_without_an_answer():
    twin = PostgresLayer(decide=_allow, target="t", user="app", password="pw")
    fetch = CatalogFetch(twin, "app", "shop", generation=0)
    fetch.handle(Start(("10.0.0.1", 5432)))
    fetch.handle(DataReceived(UPSTREAM, m.authentication(m.AUTH_OK) + m.ready_for_query()))
    assert (Playbook(fetch) >> DataReceived(UPSTREAM, m.error_response("timeout", "57014"))
            << Close("catalog query failed: timeout"))


def test_ready_layer_without_a_catalog_cache_still_masks_by_names():
    layer = ready_layer(masker=masker())
    query(layer, "SELECT ssn AS s FROM people")
    assert SECRET not in to_client(rows(layer, [("s", 4242, 3)], [SECRET]))


# ------------------------------------------------------------------ the search path

def rule_layer(cache=None):
    from hostagent.policy import Rule
    policy = Policy(rules=(Rule(name="secrets", action="deny", reason="no",
                                matchers=(("tables", ("private.secrets",)),)),))
    cache = cache or CatalogCache()
    layer = PostgresLayer(decide=lambda r: decide(policy, r), target="t", user="app",
                          password="pw", catalogs=cache, wants_catalog=True)
    layer.handle(Start(("10.0.0.1", 5432)))
    feed(layer, CLIENT, m.startup_message({"user": "x", "database": "shop"}))
    feed(layer, UPSTREAM, m.authentication(m.AUTH_OK) + m.ready_for_query())
    cat = Catalog({1: Relation("private", "secrets", "r", ("a",)),
                   2: Relation("public", "secrets", "r", ("a",))}, {}, frozenset(),
                  "public", generation=cache.generation)
    layer.handle(SideAnswered(0, cat))
    return layer


def decision(out) -> str:
    return next(c.fields["decision"]["action"] for c in out
                if getattr(c, "kind", "") == "command")


@pytest.mark.parametrize("script,expected", [
    (["DROP TABLE secrets"], "allow"),                        # public.secrets: the path's
    (["DROP TABLE private.secrets"], "deny"),
    (["SET search_path = private", "DROP TABLE secrets"], "deny"),
    (['SET search_path TO "private", public', "DROP TABLE secrets"], "deny"),
    (["SET search_path = private", "RESET search_path", "DROP TABLE secrets"], "allow"),
    (["SELECT set_config('search_path', 'priv' || 'ate', false)", "DROP TABLE secrets"], "deny"),
    (["BEGIN", "SET search_path = public", "ROLLBACK", "DROP TABLE secrets"], "deny"),
    (["SET search_path = private; RESET ALL", "DROP TABLE secrets"], "allow"),
    # names that resolve when they run, under a path that may change by then
    (["PREPARE s AS SELECT * FROM secrets"], "deny"),
    (["CREATE FUNCTION f() RETURNS SETOF text LANGUAGE sql SET search_path = private "
      "AS $$SELECT a FROM secrets$$"], "deny"),
])
def test_table_rules_match_the_relation_the_search_path_finds(script, expected):
    layer = rule_layer()
    for sql in script[:-1]:
        query(layer, sql)
        status = b"T" if sql == "BEGIN" else b"I"
        feed(layer, UPSTREAM, m.frame(b"C", b"SET\0") + m.ready_for_query(status))
    assert decision(query(layer, script[-1])) == expected, script


@pytest.mark.parametrize("sql,cols", [
    ("SELECT * FROM get_people()", [("ssn", 0, 0)]),          # a function's row: by name
    ("SELECT stash(1) AS x", [("x", 0, 0)]),                   # the database's own code
    ("SELECT s FROM (VALUES ('a')) v(s), people p WHERE p.ssn = s", [("s", 0, 0)]),
])
def test_values_the_server_names_no_table_for_are_masked_when_they_may_be_masked(sql, cols):
    layer = catalog_layer(columns=("*.ssn",))
    query(layer, sql)
    assert SECRET not in to_client(rows(layer, cols, [SECRET])), sql


def test_a_table_renamed_by_an_alias_list_is_read_whole():
    layer = catalog_layer()
    query(layer, "SELECT c || '' FROM people x(a, b, c)")
    assert SECRET not in to_client(rows(layer, [("?column?", 0, 0)], [SECRET]))


def describe_then_run(layer, described: bytes, run: bytes, extra: bytes = b"") -> bytes:
    """Describe one text, then (re-using the name, no Describe) run another."""
    feed(layer, CLIENT, m.frame(b"P", b"\0" + described + b"\0\0\0") + m.frame(b"D", b"S\0")
         + m.frame(b"S"))
    feed(layer, UPSTREAM, m.frame(b"1") + m.frame(b"t", b"\0\0")
         + m.row_description([m.Column("x", 0, 0, 25, -1, -1, 0)]) + m.ready_for_query())
    feed(layer, CLIENT, extra + m.frame(b"P", b"\0" + run + b"\0\0\0")
         + m.frame(b"B", b"\0\0\0\0\0\0\0\0") + m.frame(b"E", b"\0\0\0\0\0")
         + m.frame(b"S"))
    return to_client(feed(layer, UPSTREAM, m.frame(b"1") + m.frame(b"2")
                          + m.data_row([SECRET]) + m.frame(b"C", b"SELECT 1\0")
                          + m.ready_for_query()))


def test_a_shape_described_for_one_text_never_masks_rows_of_another():
    sent = describe_then_run(catalog_layer(), b"SELECT 'abc'::text AS x",
                             b"SELECT ssn FROM people LIMIT 1")
    assert SECRET not in sent and b"****" in sent


def test_a_portal_no_bind_of_ours_made_has_its_rows_masked_whole():
    # DECLARE c CURSOR ... (SQL), then a protocol Execute of portal "c"
    layer = catalog_layer()
    describe_then_run(layer, b"SELECT 'abc'::text AS x", b"SELECT 1")
    feed(layer, CLIENT, m.frame(b"E", b"c\0\0\0\0\0") + m.frame(b"S"))
    sent = to_client(feed(layer, UPSTREAM, m.data_row([SECRET]) + m.frame(b"s")
                          + m.ready_for_query()))
    assert SECRET not in sent


def test_sql_run_from_text_has_its_result_masked():
    layer = catalog_layer()
    query(layer, "SELECT query_to_xml('select ssn from people', true, false, '')")
    assert SECRET not in to_client(rows(layer, [("query_to_xml", 0, 0)], [SECRET]))


def test_errors_of_writes_to_a_table_with_masked_columns_are_withheld():
    layer = catalog_layer()
    query(layer, "UPDATE people SET name = NULL WHERE id = 1")
    sent = to_client(feed(layer, UPSTREAM, m.error_response(
        "null value violates not-null constraint", "23502", detail=f"Failing row contains "
        f"(1, null, {SECRET.decode()})") + m.ready_for_query()))
    assert SECRET not in sent and b"withheld" in sent


def test_whole_row_views_views_over_functions_and_parents_are_masked():
    cat = catalog()
    cat.relations[600] = Relation("public", "wv", "v", ("z",))
    cat.relations[700] = Relation("public", "fv", "v", ("z",))
    cat.relations[800] = Relation("public", "parent", "r", ("id", "ssn"))
    cat.view_reads[600] = frozenset({(PEOPLE, 0)})   # SELECT p::text FROM people p
    cat.view_calls = frozenset({700})
    cat.parents = {PEOPLE: frozenset({800})}
    masked = cat.masked(masker())
    assert masked.rule(600, 1) and masked.rule(700, 1) and masked.rule(800, 2)
    assert masked.rule(800, 1) is None and masked.rule(CLEAN_VIEW, 1) is None
    assert {"people", "parent", "pv", "wv", "fv"} <= masked.names and "decoy" not in masked.names


def test_builtin_expressions_of_clean_columns_stay_readable():
    layer = catalog_layer(columns=("*.ssn",))
    query(layer, "SELECT upper(name) FROM people")
    assert b"BOB" in to_client(rows(layer, [("upper", 0, 0)], [b"BOB"]))


def test_a_set_that_does_not_run_does_not_move_the_search_path():
    # the role starts in `private`; a denied (or held) SET never runs: the path stays
    from hostagent.policy import Rule
    policy = Policy(rules=(
        Rule(name="secrets", action="deny", reason="no",
             matchers=(("tables", ("private.secrets",)),)),
        Rule(name="no-set", action="deny", reason="no", match=re.compile("^set ")),
    ))
    cache = CatalogCache()
    layer = PostgresLayer(decide=lambda r: decide(policy, r), target="t", user="app",
                          password="pw", catalogs=cache, wants_catalog=True)
    layer.handle(Start(("10.0.0.1", 5432)))
    feed(layer, CLIENT, m.startup_message({"user": "x", "database": "shop"}))
    feed(layer, UPSTREAM, m.authentication(m.AUTH_OK) + m.ready_for_query())
    layer.handle(SideAnswered(0, Catalog({1: Relation("private", "secrets", "r", ("a",)),
                                          2: Relation("public", "secrets", "r", ("a",))},
                                         {}, frozenset(), "private",
                                         generation=cache.generation)))
    assert decision(query(layer, "SET search_path = public")) == "deny"
    feed(layer, UPSTREAM, m.error_response("x", "42601") + m.ready_for_query())
    assert decision(query(layer, "DROP TABLE secrets")) == "deny"     # still private's


def test_ddl_drops_the_snapshot_for_table_rules_too():
    # no masks, table rules naming schemas: a table made elsewhere must be seen again
    cache = CatalogCache()
    layer = rule_layer(cache)
    query(layer, "CREATE TABLE private.other (a int)")
    feed(layer, UPSTREAM, m.frame(b"C", b"CREATE TABLE\0") + m.ready_for_query())
    assert cache.generation == 1
