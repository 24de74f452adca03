"""HTTP requests as policy requests: paths, hosts, body fields."""
from __future__ import annotations

import pytest

from hostagent.policy import Policy, Request, Rule, decide
from hostagent.protocols.http.requests import (BadTarget, field_strings, flatten,
                                               form_fields, json_patterns,
                                               normalize_target, parse_json)


def test_normalize_target():
    assert normalize_target(b"/a/./b/../c?x=1") == ("/a/c", "x=1")
    assert normalize_target(b"/%7Euser/%2F/x") == ("/~user/%2F/x", "")
    assert normalize_target(b"/..") == ("/", "")
    for bad in (b"http://evil/x", b"*", b"/a%00b", b"/a\\b"):
        with pytest.raises(BadTarget):
            normalize_target(bad)


def test_flatten_and_json_patterns_in_policy():
    doc = parse_json(b'{"a": {"b": [1, "x", {"c": null}]}, "Force": true, "n": 1e6}')
    assert field_strings(flatten(doc)) == ["$.a.b[0]=1", "$.a.b[1]=x", "$.a.b[2].c=null",
                                           "$.force=true", "$.n=1000000"]
    rule = Rule(name="r", action="deny", matchers=tuple(
        ("json", (p,)) for p in json_patterns({"$.a.b[*].c": "null", "$.force": "true"})))
    pol = Policy(rules=(rule,))
    req = lambda fields: Request(target="t", protocol="http", attributes={"json": fields})
    assert decide(pol, req(field_strings(flatten(doc)))).action == "deny"
    assert decide(pol, req(["$.force=true"])).action == "allow"     # every entry must match


def test_fields_binders_read_alike_are_one_field_given_twice_is_unparseable():
    assert field_strings(form_fields("user[admin]=true&a[]=1&a[]=2;b=x")) == [
        "$.user.admin=true", "$.a[0]=1", "$.a[1]=2", "$.b=x"]
    for pairs in (form_fields("env=staging&env=prod"),
                  flatten(parse_json('{"env": "staging", "Env": "prod"}'.encode())),
                  flatten(parse_json('{"skip": 1, "\u017fkip": 2}'.encode()))):
        with pytest.raises(ValueError):
            field_strings(pairs)
