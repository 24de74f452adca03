"""A corpus of statements (corpus.sql): destructive ones in disguise and harmless ones that
only mention destruction. Each is decided through `agentgate policy explain` under one
fixed policy, and run on a real PostgreSQL 15 to show it is what the corpus says: valid
SQL that destroys, or that doesn't, or that the server refuses."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from hostagent.protocols.postgres import classify as c
from tests.pg import PgServer

HERE = Path(__file__).parent
CORPUS_POLICY = """
default = "allow"
unparseable = "deny"

[[rules]]
name = "no-destruction"
action = "deny"
statements = ["DROP", "TRUNCATE", "DELETE"]

[[rules]]
name = "programs-need-a-human"
action = "review"
flags = ["copy_program"]

[[rules]]
name = "triggers-need-a-human"
action = "review"
flags = ["trigger"]

[[rules]]
name = "migrator-dynamic-sql"
action = "allow"
users = ["migrator"]
flags = ["dynamic_sql"]
"""
TABLES = ("orders", "staging", "delete_log", "delete", "victims", "jobs", "drop_me", "users")
FIXTURE = """
CREATE TABLE orders (id int PRIMARY KEY, item text, "drop" text, qty int);
INSERT INTO orders VALUES (1, 'book', 'no', 1), (2, 'pen', 'yes', 2), (3, 'ink', NULL, 3);
CREATE TABLE staging (id int, a text, qty int);
INSERT INTO staging VALUES (1, 'book', 5), (4, 'cap', 1);
CREATE TABLE delete_log (id serial PRIMARY KEY, note text);
INSERT INTO delete_log (note) VALUES ('DROP TABLE orders');
CREATE TABLE "delete" (x int);
INSERT INTO "delete" VALUES (1);
CREATE TABLE victims (name text);
INSERT INTO victims VALUES ('drop_me');
CREATE TABLE jobs (id int, q text);
INSERT INTO jobs VALUES (1, 'SELECT 1'), (2, 'DELETE FROM orders');
CREATE TABLE drop_me (x int);
INSERT INTO drop_me VALUES (1);
CREATE TABLE users (id int, email text, ssn text);
INSERT INTO users VALUES (1, 'a@example.com', '123-45-6789');
"""
CODE = """
CREATE EXTENSION dblink;
CREATE EXTENSION tablefunc;
CREATE FUNCTION log_delete() RETURNS trigger LANGUAGE plpgsql AS
  $$ BEGIN INSERT INTO delete_log (note) VALUES ('deleted ' || OLD.id); RETURN OLD; END $$;
CREATE FUNCTION purge_all() RETURNS trigger LANGUAGE plpgsql AS
  $$ BEGIN DELETE FROM orders; RETURN NULL; END $$;
CREATE PROCEDURE purge_proc() LANGUAGE sql AS $$ DELETE FROM orders $$;
CREATE PROCEDURE setter(INOUT x text) LANGUAGE plpgsql AS
  $$ BEGIN x := 'DELETE FROM orders'; END $$;
CREATE FUNCTION do_nothing() RETURNS event_trigger LANGUAGE plpgsql AS $$ BEGIN END $$;
CREATE PROCEDURE do_nothing_proc() LANGUAGE sql AS $$ SELECT 1 $$;
"""
HEADER = re.compile(r"--@ (allow|deny|review) (harmless|destroys|runs|parses|rejected)"
                    r"((?: \w+=\S+)*) : (.+)")


def load_corpus() -> list[dict]:
    cases, current = [], None
    for line in (HERE / "corpus.sql").read_text().splitlines():
        m = HEADER.fullmatch(line)
        if m:
            current = {"decision": m[1], "server": m[2], "note": m[4], "lines": [],
                       **dict(kv.split("=", 1) for kv in m[3].split())}
            cases.append(current)
        elif line.startswith("--@"):
            raise AssertionError(f"bad corpus header: {line}")
        elif current is not None:
            current["lines"].append(line)
    for case in cases:
        case["sql"] = "\n".join(case.pop("lines")).strip()
    return cases


CORPUS = load_corpus()


def test_the_corpus_is_large_and_balanced():
    assert len(CORPUS) >= 150
    harmless = [x for x in CORPUS if x["server"] == "harmless"]
    destroys = [x for x in CORPUS if x["server"] == "destroys"]
    assert len(harmless) >= 60 and len(destroys) >= 60
    assert all(x["sql"] for x in CORPUS)


@pytest.fixture(scope="module")
def server():
    s = PgServer().start()
    s.sql("CREATE DATABASE scratch")
    s.sql(FIXTURE + CODE, db="shop")
    s.sql(FIXTURE, db="scratch")
    s.dsn = f"host={s.dir} port={s.port} user=postgres dbname=scratch"
    yield s
    s.stop()


def sql_of(case: dict, dsn: str) -> str:
    return case["sql"].replace("{dsn}", dsn)


def test_each_decision_through_agentgate_policy_explain(tmp_path, server):
    import importlib

    from click.testing import CliRunner

    from agentgate.cli.main import cli
    importlib.import_module("agentgate.cli.policy")   # registers the command, as main() does
    policy = tmp_path / "policy.toml"
    policy.write_text(CORPUS_POLICY)
    runner = CliRunner()
    wrong = []
    for case in CORPUS:
        r = runner.invoke(cli, ["policy", "explain", str(policy), "--target", "shop-db",
                                "--database", "shop", "--user", case.get("user", "agent"),
                                "--sql", sql_of(case, server.dsn), "--json"])
        assert r.exit_code == 0, (case, r.output)
        out = json.loads(r.output)
        if out["action"] != case["decision"] or out["rule"] != case.get("rule", out["rule"]):
            wrong.append(f"{case['sql']!r} ({case['note']}): expected {case['decision']} "
                         f"{case.get('rule', '')}, got {out['action']} by {out['rule']}: "
                         f"{out['reason']}")
    assert not wrong, "\n".join(wrong)


def test_each_statement_is_what_the_corpus_says_on_a_real_server(server):
    import psycopg
    shop = psycopg.connect(host=str(server.dir), port=server.port, user="postgres",
                           dbname="shop")
    scratch = psycopg.connect(host=str(server.dir), port=server.port, user="postgres",
                              dbname="scratch", autocommit=True)
    with shop.cursor() as cur:   # what each table holds, to see what a statement destroys
        cur.execute("CREATE SCHEMA snap")
        cur.execute("".join(f'CREATE TABLE snap."{t}" AS TABLE public."{t}";' for t in TABLES))
        cur.execute("SET statement_timeout = '5s'")
    shop.commit()
    scratch.execute("CREATE SCHEMA snap")
    scratch.execute("".join(f'CREATE TABLE snap."{t}" AS TABLE public."{t}";' for t in TABLES))
    wrong = []
    for case in CORPUS:
        sql = sql_of(case, server.dsn)
        error, lost = None, False
        try:
            with shop.transaction(force_rollback=True), shop.cursor() as cur:
                cur.execute(sql)
                lost = _lost(cur)
        except psycopg.Error as exc:
            error = exc
        if shop.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
            shop.rollback()
        shop.execute("DEALLOCATE ALL")
        shop.commit()
        if "{dsn}" in case["sql"]:
            lost = lost or _lost(scratch.cursor())
            _reset(scratch)
        got = ("rejected" if error is not None and error.sqlstate == "42601" else
               "parses" if error is not None else
               "destroys" if lost else "harmless")
        expected = case["server"]
        ok = got == expected or (expected == "runs" and got in ("harmless", "destroys"))
        if not ok:
            wrong.append(f"{case['sql']!r} ({case['note']}): expected {expected}, got {got}"
                         + (f" ({error.sqlstate}: {str(error).strip()})" if error else ""))
    shop.close()
    scratch.close()
    assert not wrong, "\n".join(wrong)


def _lost(cur) -> bool:
    """Whether a row or a table of the fixture is gone (or changed)."""
    for t in TABLES:
        try:
            cur.execute(f'SELECT count(*) FROM (TABLE snap."{t}" EXCEPT ALL '
                        f'TABLE public."{t}") x')
        except Exception:
            return True   # the table, or one of its columns, is gone
        if cur.fetchone()[0]:
            return True
    return False


def _reset(scratch) -> None:
    scratch.execute("DROP SCHEMA public CASCADE; CREATE SCHEMA public;")
    scratch.execute(FIXTURE)


def _numbers_changed(sql: str) -> str | None:
    """The text with each numeric literal (outside strings) replaced by another number."""
    from pglast.parser import scan
    try:
        tokens = scan(sql)
    except Exception:
        return None
    out, at, changed = [], 0, False
    for t in tokens:
        if t.name == "ICONST" and sql[t.start:t.end + 1].isdigit():
            out += [sql[at:t.start], str(int(sql[t.start:t.end + 1]) + 7919)]
            at, changed = t.end + 1, True
    return "".join(out) + sql[at:] if changed else None


def test_a_cached_judgement_is_never_inherited_by_a_text_that_does_something_else(server):
    """The shape cache shares a judgement between texts that differ only in numbers:
    for every corpus text, a variant with other numbers is judged from the cache exactly
    as it is when judged afresh."""
    tried = 0
    for case in CORPUS:
        sql = sql_of(case, server.dsn)
        variant = _numbers_changed(sql)
        if variant is None:
            continue
        try:
            c.classify(sql)                       # primes both caches
            cached = c.classify(variant)
        except c.Unparseable:
            continue
        fresh, _ = c._classify(variant)
        tried += 1
        for a, b in zip(cached, fresh, strict=True):
            assert (a.kinds, a.tables, a.functions, a.flags, a.unknown, a.text) == \
                (b.kinds, b.tables, b.functions, b.flags, b.unknown, b.text), variant
    assert tried >= 20


def test_cut_and_spliced_texts_are_judged_or_unparseable_never_an_error():
    """Every prefix-cut of every corpus text, and corpus bodies spliced into each other's
    SQL-running calls: a judgement or Unparseable, never another exception."""
    texts = [sql_of(case, "dbname=x") for case in CORPUS]
    for sql in texts:
        for cut in range(1, len(sql), max(1, len(sql) // 12)):
            try:
                c.classify(sql[:cut])
            except c.Unparseable:
                pass
    for i, sql in enumerate(texts):
        inner = texts[(i * 7) % len(texts)].replace("'", "''")
        for wrap in (f"SELECT cron.schedule('{inner}')", f"SELECT dblink_exec('{inner}')",
                     f"DO $q$ BEGIN EXECUTE '{inner}'; END $q$",
                     f"SELECT set_config('{inner}', '{inner}', false)"):
            try:
                c.classify(wrap)
            except c.Unparseable:
                pass
