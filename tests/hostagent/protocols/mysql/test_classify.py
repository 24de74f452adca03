"""MySQL statements are judged by what the server would run, whatever they look like.

Readings marked "(MariaDB)" were checked against a real MariaDB 10.11 server (multi-
statement texts over pymysql: whether `t` survived, or what was returned)."""
import os
import re
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hostagent.protocols.mysql.classify import Statement, Unparseable, classify


def one(sql) -> Statement:
    (s,) = classify(sql)
    return s


def check(s: Statement, want: dict) -> None:
    for key, value in want.items():
        got = getattr(s, key)
        if key in ("kinds", "flags", "unknown", "reads"):
            got, value = set(got), set(value)
        assert got == value, f"{key}: {got!r} != {value!r}"


# (text, what its one statement must say); unlisted fields are not checked, except that
# `unknown` is empty unless listed
CASES = [
    # queries and their shapes
    ("SELECT a FROM t WHERE b = 1", dict(kind="SELECT", kinds={"SELECT"}, tables=("t",),
                                        reads={"a", "b"}, flags=set(), copies=False)),
    ("select * from Shop.Orders o join items i using (id)",
     dict(tables=("shop.orders", "items"), reads={"id"})),
    ("TABLE t", dict(kind="SELECT", tables=("t",))),
    ("VALUES ROW(1, 2)", dict(kind="SELECT", tables=())),
    ("WITH c AS (SELECT a FROM s) SELECT * FROM c", dict(kind="SELECT", tables=("c", "s"))),
    ("(SELECT a FROM t) UNION (SELECT b FROM u)", dict(kind="SELECT", tables=("t", "u"))),
    ("SELECT * FROM t FOR UPDATE", dict(kind="SELECT", tables=("t",))),
    ("SELECT * FROM t LOCK IN SHARE MODE", dict(kind="SELECT", tables=("t",))),
    ("SELECT 1 FROM dual", dict(kind="SELECT", tables=())),
    ("SELECT a FROM t WHERE b = (SELECT c FROM u)", dict(tables=("t", "u"), reads={"a", "b", "c"})),
    ("SELECT ifnull(a, b), db.fn(1), `odd fn`(2) FROM t",
     dict(functions=("ifnull", "db.fn", "odd fn"))),
    # files, variables, copies
    ("SELECT * FROM t INTO OUTFILE '/tmp/x' FIELDS TERMINATED BY ',' LINES TERMINATED BY '\\n'",
     dict(kind="SELECT", tables=("t",), flags={"server_files"}, copies=True)),
    ("SELECT a INTO DUMPFILE '/tmp/x' FROM t", dict(flags={"server_files"}, copies=True)),
    ("SELECT a, b INTO @x, @y FROM t", dict(tables=("t",), flags={"into_var"}, copies=True)),
    ("SELECT @v := ssn FROM people", dict(tables=("people",), flags={"into_var"}, copies=True,
                                         reads={"ssn"})),
    ("SELECT LOAD_FILE('/etc/passwd')", dict(functions=("load_file",), flags={"server_files"})),
    ("SELECT sys_exec('id'), sleep(1), benchmark(1, md5('x'))",
     dict(functions=("sys_exec", "sleep", "benchmark", "md5"))),
    # writes
    ("INSERT INTO t VALUES (1) ON DUPLICATE KEY UPDATE a = b",
     dict(kind="INSERT", kinds={"INSERT"}, tables=("t",), copies=True)),
    ("INSERT LOW_PRIORITY IGNORE INTO t (a) VALUES (1)", dict(kind="INSERT", copies=False)),
    ("INSERT INTO t SET a = 1", dict(kind="INSERT", copies=False)),
    ("INSERT INTO t SELECT ssn FROM people", dict(kinds={"INSERT", "SELECT"},
                                                 tables=("t", "people"), copies=True)),
    ("REPLACE INTO t SELECT * FROM s", dict(kind="REPLACE", kinds={"REPLACE", "SELECT"},
                                           tables=("t", "s"), copies=True)),
    ("UPDATE t SET a = 1 WHERE id = 2", dict(kind="UPDATE", flags=set(), copies=False)),
    ("UPDATE LOW_PRIORITY IGNORE t SET a = 1", dict(kind="UPDATE", flags={"no_where"})),
    ("UPDATE t SET copy = ssn WHERE id = 1", dict(copies=True, reads={"copy", "ssn", "id"})),
    ("UPDATE t1 JOIN t2 ON t1.id = t2.id SET t1.b = t2.b WHERE t1.c = 1",
     dict(kind="UPDATE", tables=("t1", "t2"), copies=True)),
    ("DELETE FROM t", dict(kind="DELETE", flags={"no_where"})),
    ("DELETE t1 FROM t1 JOIN t2 ON t1.a = t2.a WHERE t2.b = 1",
     dict(kind="DELETE", tables=("t1", "t2"), flags=set())),
    ("WITH c AS (SELECT id FROM s) DELETE FROM t WHERE id IN (SELECT id FROM c)",
     dict(kind="DELETE", kinds={"DELETE", "SELECT"})),
    # DDL
    ("CREATE TABLE x AS SELECT * FROM t", dict(kind="CREATE", kinds={"CREATE", "SELECT"},
                                               tables=("x", "t"), copies=True)),
    ("CREATE TABLE x (a INT, KEY (a)) ENGINE=InnoDB", dict(kind="CREATE", copies=False)),
    ("CREATE TABLE x (a INT) ENGINE=CONNECT TABLE_TYPE=CSV FILE_NAME='/etc/passwd'",
     dict(flags={"server_files"})),
    ("CREATE ALGORITHM=MERGE DEFINER=`root`@`localhost` SQL SECURITY DEFINER VIEW v AS "
     "SELECT ssn FROM people", dict(kinds={"CREATE", "SELECT"}, tables=("v", "people"),
                                    copies=True)),
    ("CREATE VIEW v AS SELECT a FROM t WHERE b IN (SELECT c FROM u) WITH LOCAL CHECK OPTION",
     dict(kinds={"CREATE", "SELECT"}, tables=("v", "t", "u"))),
    ("CREATE DATABASE d", dict(kind="CREATE", tables=())),
    ("CREATE USER 'u'@'%' IDENTIFIED BY 'pw'", dict(kind="CREATE", tables=())),
    ("ALTER TABLE t ADD c INT", dict(kind="ALTER", tables=("t",), copies=False)),
    ("ALTER TABLE t ADD COLUMN c TEXT AS (ssn)", dict(kind="ALTER", copies=True)),
    ("ALTER TABLE t CHANGE ssn visible TEXT", dict(kind="ALTER", copies=True)),
    ("ALTER TABLE t CONVERT TO CHARACTER SET utf8mb4", dict(kind="ALTER", tables=("t",))),
    ("ALTER TABLE t EXCHANGE PARTITION p WITH TABLE u", dict(tables=("t", "u"))),
    ("DROP TABLE IF EXISTS a, db.b", dict(kind="DROP", tables=("a", "db.b"))),
    ("DROP INDEX i ON t", dict(kind="DROP", tables=("t",))),
    ("DROP PROCEDURE p", dict(kind="DROP", tables=())),
    ("TRUNCATE TABLE t", dict(kind="TRUNCATE", tables=("t",))),
    ("RENAME TABLE a TO b, c TO d", dict(kind="RENAME", tables=("a", "b", "c", "d"))),
    ("CREATE FUNCTION f RETURNS STRING SONAME 'lib_mysqludf_sys.so'",
     dict(kind="CREATE", flags={"udf"})),
    ("INSTALL PLUGIN x SONAME 'ha_x.so'", dict(kind="INSTALL", flags={"udf"})),
    ("INSTALL SONAME 'ha_x'", dict(kind="INSTALL", flags={"udf"})),
    ("UNINSTALL PLUGIN x", dict(kind="UNINSTALL")),
    # the rest of MySQL's statements
    ("DO sleep(1)", dict(kind="DO", kinds={"DO"}, functions=("sleep",))),
    ("DO (SELECT count(*) FROM t)", dict(kinds={"DO", "SELECT"}, tables=("t",))),
    ("CALL p()", dict(kind="CALL", functions=("p",))),
    ("CALL db.p(1, (SELECT a FROM s))", dict(kinds={"CALL", "SELECT"}, functions=("db.p",),
                                            tables=("s",))),
    ("HANDLER t OPEN", dict(kind="HANDLER", tables=("t",))),
    ("HANDLER t READ FIRST WHERE a = (SELECT b FROM u) LIMIT 2",
     dict(kind="HANDLER", kinds={"HANDLER", "SELECT"}, tables=("t", "u"))),
    ("HANDLER t CLOSE", dict(kind="HANDLER")),
    ("SHOW GRANTS", dict(kind="SHOW", tables=())),
    ("SHOW GRANTS FOR CURRENT_USER()", dict(kind="SHOW")),
    ("SHOW FULL COLUMNS FROM t FROM db", dict(kind="SHOW", tables=("db.t",))),
    ("SHOW CREATE TABLE t", dict(kind="SHOW", tables=("t",))),
    ("SHOW TABLES WHERE (SELECT sleep(1))", dict(kinds={"SHOW", "SELECT"}, functions=("sleep",))),
    ("USE db", dict(kind="USE", database="db")),
    ("USE `my db`", dict(kind="USE", database="my db")),
    ("KILL QUERY 5", dict(kind="KILL", kill=("query", 5))),
    ("KILL CONNECTION 5", dict(kind="KILL", kill=("connection", 5))),
    ("KILL 7", dict(kind="KILL", kill=("connection", 7))),
    ("BEGIN", dict(kind="TRANSACTION")),
    ("START TRANSACTION READ ONLY", dict(kind="TRANSACTION")),
    ("COMMIT", dict(kind="TRANSACTION")),
    ("ROLLBACK TO SAVEPOINT a", dict(kind="TRANSACTION")),
    ("SAVEPOINT a", dict(kind="TRANSACTION")),
    ("RELEASE SAVEPOINT a", dict(kind="TRANSACTION")),
    ("XA START 'x'", dict(kind="TRANSACTION")),
    ("LOCK TABLES t READ, db.u AS x WRITE", dict(kind="LOCK", tables=("t", "db.u"))),
    ("UNLOCK TABLES", dict(kind="LOCK")),
    ("EXPLAIN SELECT * FROM t", dict(kind="EXPLAIN", kinds={"EXPLAIN"}, tables=("t",))),
    ("EXPLAIN FORMAT=JSON DELETE FROM t", dict(kinds={"EXPLAIN"}, tables=("t",))),
    ("EXPLAIN ANALYZE DELETE FROM t", dict(kinds={"EXPLAIN", "DELETE"}, flags={"no_where"})),
    ("ANALYZE DELETE FROM t WHERE a = 1", dict(kinds={"EXPLAIN", "DELETE"})),
    ("DESCRIBE t", dict(kind="EXPLAIN", tables=("t",))),
    ("DESC SELECT 1", dict(kind="EXPLAIN", kinds={"EXPLAIN"})),
    ("GRANT SELECT (a, b) ON db.t TO u", dict(kind="GRANT", tables=("db.t",))),
    ("GRANT ALL ON *.* TO 'u'@'%' WITH GRANT OPTION", dict(kind="GRANT", tables=("*.*",))),
    ("REVOKE SELECT ON db.* FROM u", dict(kind="REVOKE", tables=("db.*",))),
    ("GRANT EXECUTE ON PROCEDURE db.p TO u", dict(kind="GRANT", tables=())),
    ("OPTIMIZE TABLE t", dict(kind="MAINTENANCE", tables=("t",))),
    ("ANALYZE TABLE t, u", dict(kind="MAINTENANCE", tables=("t", "u"))),
    ("CHECK TABLE t FOR UPGRADE", dict(kind="MAINTENANCE", tables=("t",))),
    ("CHECK VIEW v", dict(kind="MAINTENANCE", tables=("v",))),
    ("REPAIR NO_WRITE_TO_BINLOG TABLE t QUICK", dict(kind="MAINTENANCE", tables=("t",))),
    ("FLUSH PRIVILEGES", dict(kind="FLUSH")),
    ("FLUSH TABLES t1, t2 WITH READ LOCK", dict(kind="FLUSH", tables=("t1", "t2"))),
    ("SHUTDOWN", dict(kind="SHUTDOWN")),
    ("RESET MASTER", dict(kind="RESET")),
    ("PURGE BINARY LOGS BEFORE NOW() - INTERVAL 3 DAY", dict(kind="PURGE", functions=("now",))),
    ("CHANGE MASTER TO MASTER_HOST='h', IGNORE_SERVER_IDS = (1, 2)", dict(kind="CHANGE")),
    ("BINLOG 'AAAA'", dict(kind="BINLOG")),
    ("CACHE INDEX t1, t2 IN hot", dict(kind="CACHE", tables=("t1", "t2"))),
    ("LOAD INDEX INTO CACHE t1", dict(kind="CACHE", tables=("t1",))),
    ("HELP 'select'", dict(kind="HELP")),
    ("SIGNAL SQLSTATE '45000' SET MESSAGE_TEXT = 'no'", dict(kind="SIGNAL")),
    # read from tokens: whatever runs in parentheses is judged
    ("SIGNAL SQLSTATE '45000' SET MESSAGE_TEXT = load_file('/etc/passwd')",
     dict(kind="SIGNAL", functions=("load_file",), flags={"server_files"})),
    ("ALTER TABLE t ADD CHECK (sleep(1) = 0)", dict(kind="ALTER", functions=("sleep",))),
    ("ALTER TABLE t ADD FOREIGN KEY (a) REFERENCES u (b), ALGORITHM = COPY, LOCK = NONE",
     dict(kind="ALTER", tables=("t", "u"))),
    ("SHOW TABLES LIKE (SELECT a FROM secret)", dict(kinds={"SHOW", "SELECT"}, tables=("secret",))),
    ("LOCK TABLES t READ, u WRITE", dict(kind="LOCK", tables=("t", "u"))),
    ("GRANT SELECT ON t TO u IDENTIFIED BY PASSWORD(load_file('/x'))",
     dict(kind="GRANT", functions=("password", "load_file"))),
    # files
    ("LOAD DATA INFILE '/etc/passwd' INTO TABLE t", dict(kind="LOAD", tables=("t",),
                                                        flags={"server_files"})),
    ("LOAD DATA LOCAL INFILE 'x.csv' INTO TABLE t (a, @b) SET c = upper(@b)",
     dict(kind="LOAD", flags={"local_files"}, unknown=set(), functions=("upper",))),
    ("LOAD DATA LOCAL INFILE 'x' INTO TABLE t SET c = load_file('/etc/shadow')",
     dict(flags={"local_files", "server_files"})),
    ("LOAD XML INFILE '/x.xml' INTO TABLE t ROWS IDENTIFIED BY '<row>'",
     dict(kind="LOAD", flags={"server_files"})),
    ("LOAD XML LOCAL INFILE 'x.xml' INTO TABLE t", dict(flags={"local_files"})),
    # SET, and what changes how later text is read
    ("SET @a = (SELECT x FROM t)", dict(kind="SET", kinds={"SET", "SELECT"}, tables=("t",),
                                        copies=True)),
    ("SET GLOBAL max_connections = 5, @@session.autocommit = ON", dict(kind="SET", flags=set())),
    ("SET sql_mode = 'ANSI_QUOTES'", dict(flags={"changes_parsing"}, unknown={"changes_parsing"})),
    # a mode spelled out without those flags (or DEFAULT: checked at login) reads the same
    ("SET SESSION sql_mode = ''", dict(unknown=set())),
    ("SET sql_mode = 'STRICT_ALL_TABLES,ansi'", dict(unknown={"changes_parsing"})),
    ("SET sql_mode = @saved", dict(unknown={"changes_parsing"})),
    ("SET sql_mode = CONCAT(@@sql_mode, ',ANSI_QUOTES')", dict(unknown={"changes_parsing"})),
    ("SET @@GLOBAL.sql_mode := 'NO_BACKSLASH_ESCAPES'", dict(unknown={"changes_parsing"})),
    ("SET autocommit = 1, LOCAL sql_mode = DEFAULT", dict(unknown=set())),
    ("SET NAMES gbk", dict(unknown={"changes_parsing"})),
    ("SET NAMES 'sjis' COLLATE 'sjis_bin'", dict(unknown={"changes_parsing"})),
    ("SET NAMES utf8mb4 COLLATE utf8mb4_bin", dict(flags=set(), unknown=set())),
    ("SET NAMES latin1", dict(unknown={"changes_parsing"})),   # 0xA0: a space to latin1
    ("SET CHARACTER SET big5", dict(unknown={"changes_parsing"})),
    ("SET CHARSET binary", dict(unknown={"changes_parsing"})),
    ("SET character_set_client = cp932", dict(unknown={"changes_parsing"})),
    ("SET @@character_set_connection = 'gb18030'", dict(unknown={"changes_parsing"})),
    ("SET collation_connection = gbk_chinese_ci", dict(unknown={"changes_parsing"})),
    ("SET character_set_client = 28", dict(unknown={"changes_parsing"})),   # gbk's id
    ("SET character_set_client = @saved", dict(unknown={"changes_parsing"})),
    ("SET character_set_client = utf8", dict(flags=set())),
    ("SET @sql_mode = 'x', @character_set_client = 'gbk'", dict(flags=set())),   # user variables
    ("SET NAMES utf8mb4, @a = (SELECT ssn FROM people)",
     dict(kinds={"SET", "SELECT"}, tables=("people",), copies=True, flags=set())),
    ("SET ROLE a, b", dict(kind="SET")),
    ("SET GLOBAL init_connect = 'DROP TABLE t'", dict(unknown={"dynamic_sql"})),
    ("SET TRANSACTION ISOLATION LEVEL READ COMMITTED", dict(kind="SET")),
    ("SET PASSWORD = PASSWORD('x')", dict(kind="SET", functions=("password",))),
    ("SET STATEMENT max_statement_time = 1 FOR DROP TABLE t",   # (MariaDB) runs the DROP
     dict(kind="SET", kinds={"SET", "DROP"}, tables=("t",))),
    # prepared statements
    ("PREPARE s FROM 'DROP TABLE t'", dict(kind="PREPARE", kinds={"PREPARE", "DROP"},
                                           tables=("t",), prepares=("s", "DROP TABLE t"))),
    ("PREPARE s FROM 'SELECT * FROM t WHERE a = ? AND b = ''x\\\\''y'''",
     dict(kinds={"PREPARE", "SELECT"},
          prepares=("s", "SELECT * FROM t WHERE a = ? AND b = 'x\\'y'"))),
    ("PREPARE s FROM 0x44524f50205441424c452074",     # (MariaDB) runs it
     dict(kinds={"PREPARE", "DROP"}, prepares=("s", "DROP TABLE t"))),
    ("PREPARE s FROM X'44454c4554452046524f4d2074'",
     dict(kinds={"PREPARE", "DELETE"}, flags={"no_where"})),
    ("PREPARE s FROM _latin1'TRUNCATE t'", dict(kinds={"PREPARE", "TRUNCATE"})),   # (MariaDB)
    ("PREPARE s FROM 'PREPARE t FROM ''DROP TABLE u'''", dict(kinds={"PREPARE", "DROP"})),
    ("PREPARE s FROM @q", dict(kinds={"PREPARE"}, flags={"dynamic_sql"},
                               unknown={"dynamic_sql"}, prepares=None)),
    ("PREPARE s FROM CONCAT('DROP ', 'TABLE t')",          # (MariaDB) any expression
     dict(unknown={"dynamic_sql"}, functions=("concat",))),
    ("EXECUTE s", dict(kind="EXECUTE", executes="s")),
    ("EXECUTE s USING @a, @b", dict(kind="EXECUTE", executes="s")),
    ("EXECUTE IMMEDIATE 'DELETE FROM t'", dict(kinds={"EXECUTE", "DELETE"},
                                               unknown={"dynamic_sql"})),
    ("EXECUTE IMMEDIATE CONCAT('DROP ', 'TABLE t')", dict(unknown={"dynamic_sql"})),
    ("DEALLOCATE PREPARE s", dict(kind="DEALLOCATE")),
    ("DROP PREPARE s", dict(kind="DEALLOCATE")),
]


@pytest.mark.parametrize("sql,want", CASES, ids=[c[0][:50] for c in CASES])
def test_statement(sql, want):
    want = {"unknown": set(), **want}
    s = one(sql)
    check(s, want)
    assert s.kind in s.kinds


# What MySQL reads differently from sqlglot (or from a naive reader), each checked against
# MariaDB: every DROP listed ran there, every "no DROP" did not.
DISGUISES = [
    ("/*!50000 DROP TABLE t */", ["DROP"]),                   # executable comment
    ("/*M!100000 DROP TABLE t */", ["DROP"]),
    ("/*!DROP TABLE t*/", ["DROP"]),
    ("SELECT /*!50000 sleep(5), */ 1", ["SELECT"]),
    ("SELECT 1--1; DROP TABLE t", ["SELECT", "DROP"]),        # `--` needs a space after
    ("SELECT 1 --x; DROP TABLE t", ["SELECT", "DROP"]),       # `1 - -x` (no column x here)
    ("SELECT 1 -- ; DROP TABLE t", ["SELECT"]),
    ("SELECT 1 --\t; DROP TABLE t", ["SELECT"]),
    ("SELECT 1 --\x01; DROP TABLE t", ["SELECT"]),            # a control character counts
    ("SELECT 1 #; DROP TABLE t", ["SELECT"]),
    ("SELECT 1 # c\n; DROP TABLE t", ["SELECT", "DROP"]),
    ("SELECT 'a\\'; DROP TABLE t; -- '", ["SELECT"]),          # backslash escapes
    ("SELECT 'a\\\\'; DROP TABLE t", ["SELECT", "DROP"]),
    ('SELECT "a"";DROP TABLE t"', ["SELECT"]),                 # doubled quotes
    ('SELECT "a\\"; DROP TABLE t; -- "', ["SELECT"]),
    ("SELECT 'a' '; DROP TABLE t'", ["SELECT"]),
    ("SELECT N'\\''; DROP TABLE t", ["SELECT", "DROP"]),
    ("SELECT X'27'; DROP TABLE t", ["SELECT", "DROP"]),
    ("SELECT 1 AS `a\\`; DROP TABLE t", ["SELECT", "DROP"]),   # no escapes in `names`
    ("SELECT 1 AS `a``; DROP TABLE t`", ["SELECT"]),
    ("SELECT `a;b` FROM `c;d`", ["SELECT"]),
    ("SELECT @`a;DROP TABLE t`, @'b''; DROP TABLE t'", ["SELECT"]),
    ("SELECT 1 /* /* */ ; DROP TABLE t; /* */", ["SELECT", "DROP"]),   # comments don't nest
    ("SELECT 1 /*+ ; DROP TABLE t */", ["SELECT"]),           # an optimizer hint is a comment
    ("SELECT 1 /*!*/; DROP TABLE t", ["SELECT", "DROP"]),
    ("SELECT 1 /*! -- x\n , 2 */; DROP TABLE t", ["SELECT", "DROP"]),
]


@pytest.mark.parametrize("sql,kinds", DISGUISES, ids=[repr(d[0])[:50] for d in DISGUISES])
def test_disguises(sql, kinds):
    if kinds is None:
        with pytest.raises(Unparseable):
            classify(sql)
        return
    got = classify(sql)
    assert [s.kind for s in got] == kinds
    if "DROP" in kinds:
        assert got[-1].tables == ("t",)
    else:
        assert not any("DROP" in s.kinds for s in got)


def test_executable_comments_are_judged_and_dropped_from_the_text():
    s = one("SELECT 1 /*!50110 , load_file('/etc/passwd') */ FROM t")
    assert s.functions == ("load_file",) and "server_files" in s.flags
    assert s.text == "SELECT 1  , load_file('/etc/passwd')  FROM t"
    s = one("SELECT 1 FROM t1 WHERE 1 /*! UNION SELECT password FROM mysql.user */")
    assert "mysql.user" in s.tables and "password" in s.reads


def test_splitting():
    a, b, c = classify("SELECT 1; DROP TABLE t;; COMMIT ;")
    assert (a.kind, b.kind, c.kind) == ("SELECT", "DROP", "TRANSACTION")
    assert (a.text, b.text, c.text) == ("SELECT 1", "DROP TABLE t", "COMMIT")
    a, b, c = classify("BEGIN; DELETE FROM t WHERE a = 1; COMMIT")
    assert a.kind == c.kind == "TRANSACTION" and b.kind == "DELETE"
    # a body without BEGIN ends at the first `;` (MariaDB ran the DROP)
    a, b = classify("CREATE PROCEDURE p() SELECT 1; DROP TABLE t")
    assert a.kinds == {"CREATE", "SELECT"} and b.kind == "DROP"
    a, b = classify("BEGIN NOT ATOMIC SELECT 1; END; DROP TABLE t")
    assert a.kind == "DO" and b.kind == "DROP"
    a, b = classify("CREATE TRIGGER tr BEFORE INSERT ON t FOR EACH ROW BEGIN IF NEW.a THEN "
                    "DELETE FROM x; END IF; END; SELECT 1")
    assert a.kinds == {"CREATE", "TRIGGER", "DELETE"} and b.kind == "SELECT"


def test_a_procedure_runs_what_its_body_runs():
    s = one("""CREATE DEFINER=`root`@`localhost` PROCEDURE p(IN a INT, OUT b TEXT)
        SQL SECURITY DEFINER COMMENT 'x' MODIFIES SQL DATA
        BEGIN
          DECLARE v TEXT DEFAULT (SELECT ssn FROM people LIMIT 1);
          DECLARE done INT DEFAULT 0;
          DECLARE c CURSOR FOR SELECT x FROM secret;
          DECLARE CONTINUE HANDLER FOR SQLSTATE '02000', NOT FOUND BEGIN DELETE FROM log; END;
          OPEN c; FETCH c INTO v; CLOSE c;
          IF v IS NULL THEN INSERT INTO leak VALUES (v);
          ELSEIF v = 'x' THEN UPDATE t SET a = 1 WHERE id = 1;
          ELSE CALL q(); END IF;
          WHILE (SELECT COUNT(*) FROM w) > 0 DO DELETE FROM w WHERE id > 0 LIMIT 1; END WHILE;
          REPEAT SET @x = @x + 1; UNTIL @x > sleep(1) END REPEAT;
          lbl: LOOP LEAVE lbl; END LOOP lbl;
          CASE v WHEN 1 THEN DROP TABLE z; ELSE SELECT CASE WHEN 1 THEN 2 END; END CASE;
          SET b = v;
        END""")
    assert s.kind == "CREATE"
    assert s.kinds == {"CREATE", "SELECT", "DELETE", "INSERT", "UPDATE", "CALL", "SET", "DROP"}
    assert set(s.tables) == {"people", "secret", "log", "leak", "t", "w", "z"}
    assert {"sleep", "q", "count"} <= set(s.functions)
    assert s.copies and "no_where" in s.flags and not s.unknown


@pytest.mark.parametrize("sql,kinds,flags", [
    ("CREATE FUNCTION f(x INT) RETURNS INT DETERMINISTIC RETURN (SELECT COUNT(*) FROM secret)",
     {"CREATE", "SELECT"}, set()),
    ("CREATE FUNCTION f() RETURNS VARCHAR(10) CHARSET utf8mb4 READS SQL DATA "
     "BEGIN RETURN load_file('/etc/passwd'); END", {"CREATE"}, {"server_files"}),
    ("CREATE AGGREGATE FUNCTION f(x INT) RETURNS INT BEGIN DECLARE s INT DEFAULT 0; "
     "LOOP FETCH GROUP NEXT ROW; SET s = s + x; END LOOP; END", {"CREATE", "SET"}, set()),
    ("CREATE PROCEDURE p() BEGIN PREPARE s FROM 'DROP TABLE t'; EXECUTE s; END",
     {"CREATE", "PREPARE", "EXECUTE", "DROP"}, set()),
    ("CREATE PROCEDURE p() BEGIN PREPARE s FROM @q; EXECUTE s; END",
     {"CREATE", "PREPARE", "EXECUTE"}, {"dynamic_sql"}),
    ("CREATE PROCEDURE p() EXECUTE s", {"CREATE", "EXECUTE"}, {"dynamic_sql"}),
    ("CREATE PROCEDURE p() BEGIN SET SESSION sql_mode = 'ANSI_QUOTES'; END",
     {"CREATE", "SET"}, {"changes_parsing"}),
    ("CREATE EVENT e ON SCHEDULE EVERY 1 HOUR STARTS NOW() + INTERVAL 1 DAY "
     "DO DELETE FROM t WHERE a < 1", {"CREATE", "DELETE"}, set()),
    ("CREATE EVENT e ON SCHEDULE AT (SELECT MAX(at) FROM plan) DO BEGIN "
     "INSERT INTO a SELECT * FROM b; END", {"CREATE", "INSERT", "SELECT"}, set()),
    ("ALTER EVENT e DO DROP TABLE t", {"ALTER", "DROP"}, set()),
    ("ALTER EVENT e ON SCHEDULE EVERY 2 DAY", {"ALTER"}, set()),
    ("CREATE TRIGGER tr AFTER DELETE ON db.t FOR EACH ROW FOLLOWS other "
     "INSERT INTO audit VALUES (OLD.id)", {"CREATE", "TRIGGER", "INSERT"}, {"trigger"}),
    # MariaDB runs compound statements outside stored programs, too
    ("BEGIN NOT ATOMIC DECLARE x INT DEFAULT (SELECT 5); SELECT x; END", {"DO", "SELECT"}, set()),
    ("IF (SELECT 1) THEN DROP TABLE t; END IF", {"DO", "SELECT", "DROP"}, set()),
    ("IF CASE WHEN 1 THEN 1 END THEN DROP TABLE t; END IF", {"DO", "DROP"}, set()),
    ("CASE WHEN 1 THEN TRUNCATE t; END CASE", {"DO", "TRUNCATE"}, set()),
    ("WHILE 0 DO UPDATE t SET a = 1 WHERE b = 2; END WHILE", {"DO", "UPDATE"}, set()),
    ("REPEAT DELETE FROM t WHERE a = 1; UNTIL 1 END REPEAT", {"DO", "DELETE"}, set()),
    ("BEGIN NOT ATOMIC DECLARE EXIT HANDLER FOR SQLEXCEPTION DROP TABLE t; "
     "SIGNAL SQLSTATE '45000'; END", {"DO", "DROP", "SIGNAL"}, set()),
])
def test_bodies(sql, kinds, flags):
    s = one(sql)
    assert s.kinds == kinds and flags <= s.flags


def test_trigger_and_event_tables():
    s = one("CREATE TRIGGER tr AFTER DELETE ON db.t FOR EACH ROW SET NEW.a = OLD.b")
    assert s.tables == ("db.t",) and s.copies and {"a", "b"} <= s.reads
    s = one("CREATE EVENT e ON SCHEDULE AT (SELECT MAX(at) FROM plan) DO DELETE FROM t")
    assert set(s.tables) == {"plan", "t"} and "max" in s.functions


UNPARSEABLE = [
    "SELECT 'abc", "SELECT \"abc", "SELECT `abc", "SELECT 1 /* x", "SELECT 1 /*! x",
    "DROP TABEL t", "FOO BAR", "END", "DELIMITER //", "SELECT 1 \\G", "SELECT 1\x00",
    "DROP\u00a0TABLE t",                        # (MariaDB) a name, not a space
    # executable comments that the two readings end in different places (MariaDB, version
    # newer than itself: skipped to the first `*/`, running the DROP)
    "SELECT 1 /*!99999 '*/ ; DROP TABLE t; -- ' */",
    "SELECT 1 /*!999999 '*/ ; DROP TABLE t; -- ' */",
    "SELECT 1 /*M!999999 '*/ ; DROP TABLE t; -- ' */",
    "SELECT 1 /*!12345 -- */ ; DROP TABLE t; -- \n */",
    "SELECT 1 /*!50000 ; DROP TABLE t */",
    "SELECT 1 /*! , 2 /* x */ , 3 */",
    "SELECT 1 /*!500001DROP */",                 # MySQL reads 5 digits, MariaDB 6
    "SELECT 1 /*!5000000 */",
    # compound statements that don't close, or go on after their end
    "CREATE PROCEDURE p() BEGIN SELECT 1;", "BEGIN NOT ATOMIC SELECT 1; END x y",
    "CREATE PROCEDURE p() BEGIN SELECT 1; END DROP TABLE t",
    "IF 1 THEN SELECT 1 END IF", "BEGIN; DROP TABLE t; END",
    "FOR i IN 1..2 DO SELECT i; END FOR",
    "CREATE PROCEDURE p(a INT DEFAULT (SELECT 1)) SELECT a",   # MariaDB 11.8 defaults
    "BEGIN NOT ATOMIC " + "BEGIN " * 200 + "SELECT 1; " + "END; " * 200 + "END",
    # what can't be read with certainty
    "KILL QUERY ID 5", "KILL USER u", "KILL CONNECTION_ID()",
    "START SLAVE", "CHANGE DATABASE x", "CREATE TABLESPACE ts ADD DATAFILE 'x'",
    "SELECT (SELECT 1 INTO @a)", "INSERT INTO t SELECT 1 INTO @a",
    "SELECT 1 INTO @a, FROM t",
    "PREPARE s FROM 'SELECT 1; SELECT 2'",        # (MariaDB) an error
    "PREPARE s FROM X'ff'", "PREPARE s FROM _gbk'DROP \u8868'",
    "PREPARE s FROM " + "'PREPARE s FROM " * 12 + "x",
    "USE a b",
    "SELECT " + "(" * 5000 + "1" + ")" * 5000,
    "SELECT 1" + "-" * 5000 + "1",
]


@pytest.mark.parametrize("sql", UNPARSEABLE, ids=[repr(u)[:50] for u in UNPARSEABLE])
def test_unparseable(sql):
    with pytest.raises(Unparseable):
        classify(sql)
    with pytest.raises(Unparseable):     # cached, and still raised
        classify(sql)


def test_names_and_literals_as_mysql_reads_them():
    s = one("SELECT t.1e5, 1e5a, 1.5b, `1a`.x FROM t")    # (MariaDB) 1e5 is a name after t.
    assert {"1e5", "x"} <= s.reads and s.tables == ("t",)
    assert one("SELECT t.select FROM t").reads == {"select"}
    s = one("SELECT * FROM `my;db`.`my``table`")
    assert s.tables == ("my;db.my`table",)
    assert one("SELECT _utf8mb4'x' COLLATE utf8mb4_bin, \\N").kind == "SELECT"


def test_cached_by_text_and_by_tokens():
    a = classify("SELECT a FROM t WHERE id = 1")
    assert classify("SELECT a FROM t WHERE id = 1") == a
    b = classify("select a from t where id = 1  # spelled otherwise")
    assert b[0].text == "select a from t where id = 1" and b[0].tables == ("t",)


def test_the_two_caches_do_not_mix():
    classify("SELECT 1")
    with pytest.raises(Unparseable):
        classify("\0SELECT 1")


MTR = "/usr/share/mysql/mysql-test/main/"
_MTR_COMMANDS = re.compile(r"(--|#|(let|eval|echo|error|connect|connection|disconnect|source|"
                           r"if|while|send|reap|sleep|inc|dec|disable_\w+|enable_\w+|replace_\w+|"
                           r"sorted_result|query_vertical|[{}])\b)", re.I)


def _mtr_statements(path):
    """The statements of a mysqltest script, roughly (its own commands skipped)."""
    delimiter, text = ";", ""
    for line in open(path, errors="replace"):
        if not text:
            if not line.strip() or _MTR_COMMANDS.match(line.strip()):
                continue
            if line.strip().lower().startswith("delimiter "):
                delimiter = line.split()[1].removesuffix(delimiter) or delimiter
                continue
        text += line
        if line.rstrip().endswith(delimiter):
            yield text.rstrip()[:-len(delimiter)]
            text = ""


@pytest.mark.skipif(not os.path.isdir(MTR), reason="MariaDB's test suite is not installed")
def test_mariadb_own_test_suite_gives_statements_or_unparseable():
    read = unread = 0
    for name in ("sp", "sp-vars", "ps", "trigger", "events_1", "derived", "subselect", "view"):
        for text in _mtr_statements(MTR + name + ".test"):
            try:
                classify(text)
                read += 1
            except Unparseable:
                unread += 1
    assert read > 20 * unread


def test_a_mebibyte_is_read_in_bounded_time():
    for text in ("SELECT '" + "x" * (1 << 20) + "'", "SELECT '" + "\\'" * (1 << 19) + "'",
                 "SELECT 1 " + "/* x */" * 140000, "SELECT 1;" * 100000,
                 "SELECT 1 " + "/*! +1 */" * 100000, "SELECT '" + "a" * (1 << 20)):
        start = time.monotonic()
        try:
            classify(text)
        except Unparseable:
            pass
        assert time.monotonic() - start < 10


_WORDS = st.sampled_from([
    "SELECT", "FROM", "t", "DROP", "TABLE", "BEGIN", "END", "NOT", "ATOMIC", "IF", "THEN",
    "CASE", "WHEN", "ELSE", "LOOP", "REPEAT", "UNTIL", "WHILE", "DO", "CREATE", "PROCEDURE",
    "TRIGGER", "EVENT", "p()", "DECLARE", "HANDLER", "FOR", "PREPARE", "s", "EXECUTE", "SET",
    "INTO", "@a", "@@sql_mode", "=", ":=", ";", ",", "(", ")", "'x'", "'a\\'b'", '"q"', "`n`",
    "--", "-- ", "#", "/*", "*/", "/*!", "/*!50000", "/*M!", "1", "0x41", "X'41'", "_utf8mb4",
    "\n", " ", ".", "*", "INSERT", "VALUES", "UPDATE", "DELETE", "WHERE", "LOAD", "DATA",
    "LOCAL", "INFILE", "KILL", "QUERY", "USE", "SHOW", "CALL", "ON", "EACH", "ROW", "lbl:",
    "RETURN", "RETURNS", "INT", "FUNCTION", "SONAME", "OUTFILE", "NAMES", "gbk", "\\N", "\\",
])


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(st.lists(_WORDS, max_size=30).map(" ".join),
                 st.lists(_WORDS, max_size=30).map("".join), st.text(max_size=80)))
def test_any_text_gives_statements_or_unparseable(text):
    start = time.monotonic()
    try:
        out = classify(text)
    except Unparseable:
        return
    finally:
        assert time.monotonic() - start < 5
    assert all(isinstance(s, Statement) and s.kind in s.kinds for s in out)


def test_a_text_too_big_to_judge_quickly_is_unparseable():
    """The judge runs on the proxy's loop: past a token count (a long IN list) or a size
    sqlglot reads slowly, a text is unparseable rather than stall every session (these
    took 1.4 s and 8 s before the caps); a long literal is one token, elided for sqlglot."""
    with pytest.raises(Unparseable, match="too many tokens"):
        classify("SELECT * FROM t WHERE id IN (" + ",".join(["1"] * 400_000) + ")")
    with pytest.raises(Unparseable, match="too long"):
        classify("SELECT * FROM t WHERE id IN (" + ",".join(["1"] * 40_000) + ")")
    assert classify("INSERT INTO t VALUES (X'" + "ab" * 400_000 + "')")[0].kinds == {"INSERT"}
