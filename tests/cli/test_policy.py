import json

from tests.support import ROOT, run_cli


def test_check_the_example_and_refuse_a_broken_file(tmp_path):
    r = run_cli("policy", "check", str(ROOT / "examples" / "policy.toml"))
    assert r.returncode == 0 and "5 rule(s)" in r.stdout
    bad = tmp_path / "p.toml"
    bad.write_text('[[rules]]\nname = "no-ddl"\naction = "deny"\nmatch = "(("\n')
    r = run_cli("policy", "check", str(bad))
    assert r.returncode == 2 and "rule 'no-ddl'" in r.stderr and "regex" in r.stderr
    bad.write_text('default = "allow"\nx = = 1\n')
    r = run_cli("policy", "check", str(bad))
    assert r.returncode == 2 and "line 2" in r.stderr      # TOML errors name the line
    bad.write_text('[[masks]]\nname = "pii"\ndetectors = ["emial"]\n')
    r = run_cli("policy", "check", str(bad))
    assert r.returncode == 2 and "unknown detector 'emial'" in r.stderr


def test_explain(tmp_path):
    policy = str(ROOT / "examples" / "policy.toml")
    r = run_cli("policy", "explain", policy, "--target", "orders-db", "--sql",
                "SELECT 1; /* c */ DrOp TABLE t", "--json")
    out = json.loads(r.stdout)
    assert (out["action"], out["rule"]) == ("deny", "no-ddl")
    assert [s["action"] for s in out["statements"]] == ["allow", "deny"]
    r = run_cli("policy", "explain", policy, "--target", "billing", "--sql", "DROP TABLE t")
    assert r.stdout.strip() == "allow (rule (default)): no rule matched"   # target glob
    r = run_cli("policy", "explain", policy, "--target", "x", "--sql", "UPDATE t SET a = 1")
    assert r.stdout.startswith("deny (rule no-unbounded-writes)")
    r = run_cli("policy", "explain", policy, "--target", "x", "--sql", "SELEC 1", "--json")
    assert json.loads(r.stdout)["rule"] == "(unparseable)"


def test_explain_an_http_request():
    policy = str(ROOT / "examples" / "policy.toml")
    r = run_cli("policy", "explain", policy, "--target", "deploy-api", "--protocol", "https",
                "--request", "POST /repos/a/git/refs/x/../main", "--body", '{"force": true}',
                "--json")
    out = json.loads(r.stdout)
    assert (out["action"], out["rule"]) == ("deny", "no-force-push")
    assert out["request"] == "POST /repos/a/git/refs/main"      # judged as normalized
    r = run_cli("policy", "explain", policy, "--target", "deploy-api", "--request",
                "POST /repos/a/git/refs/main", "--body", '{"force": false}')
    assert r.stdout.startswith("allow (rule (default))")
    r = run_cli("policy", "explain", policy, "--target", "deploy-api", "--request", "POST")
    assert r.returncode == 2 and "METHOD PATH" in r.stderr


def test_explain_an_ssh_command(tmp_path):
    policy = tmp_path / "p.toml"
    policy.write_text('default = "deny"\n[[rules]]\nname = "reads"\naction = "allow"\n'
                      'commands = ["ls", "ls *", "cat *"]\n')
    r = run_cli("policy", "explain", str(policy), "--target", "web1", "--command", "ls -la /srv",
                "--json")
    assert json.loads(r.stdout)["rule"] == "reads"
    # every command the line runs must be allowed
    r = run_cli("policy", "explain", str(policy), "--target", "web1", "--command",
                "ls; cat /etc/hosts | sh")
    assert r.stdout.splitlines() == ["deny (rule (default)): no rule matched", "  runs: ls",
                                     "  runs: cat /etc/hosts", "  runs: sh"]
    r = run_cli("policy", "explain", str(policy), "--target", "web1", "--protocol", "ssh")
    assert r.returncode == 2 and "--command" in r.stderr


def test_explain_mysql_reads_sql_as_mysql_does(tmp_path):
    policy = tmp_path / "p.toml"
    policy.write_text('default = "allow"\n[[rules]]\nname = "no-drop"\naction = "deny"\n'
                      'statements = ["DROP"]\n')
    # an executable comment runs on MySQL; to PostgreSQL it is a comment
    text = "SELECT 1 /*!50000 , (SELECT 1 FROM t WHERE 0) */; /*!50000 DROP TABLE t */"
    r = run_cli("policy", "explain", str(policy), "--target", "db", "--protocol", "mysql",
                "--sql", text, "--json")
    assert json.loads(r.stdout)["rule"] == "no-drop"
    r = run_cli("policy", "explain", str(policy), "--target", "db", "--sql", text, "--json")
    assert json.loads(r.stdout)["action"] == "allow"
    r = run_cli("policy", "explain", str(policy), "--target", "db", "--protocol", "oracle",
                "--sql", "SELECT 1")
    assert r.returncode == 2 and "postgres or mysql" in r.stderr
