"""Statement outputs for the recording, through the layer: each answer is tied to the
statement that was sent (ids in send order, skipped ones after an error), samples stay
within their bounds, and the per-session budget ends samples but not counts."""
from hostagent.policy import Policy
from hostagent.protocols import Record, ToUpstream
from hostagent.protocols.postgres import messages as m
from hostagent.protocols.postgres.layer import PostgresLayer
from hostagent.recording.samples import SampleLimits
from tests.hostagent.protocols.playbook import CLIENT, UPSTREAM, feed
from tests.hostagent.protocols.postgres.test_layer import ready_layer


def layer(samples=None) -> PostgresLayer:
    return ready_layer(samples=samples)


def rowdesc(*names: str) -> bytes:
    return m.row_description([m.Column(n, 0, 0, 25, -1, -1, 0) for n in names])


def outputs(actions) -> list[Record]:
    return [a for a in actions if isinstance(a, Record) and a.kind == "output"]


def starts(actions) -> tuple:
    return tuple(i for a in actions if isinstance(a, ToUpstream) for i in a.starts)


def test_a_query_with_two_statements_gets_two_outputs_with_samples_and_counts():
    lay = layer()
    sent = starts(feed(lay, CLIENT, m.frame(b"Q", b"SELECT 'a'; UPDATE t SET x = 1\0")))
    assert len(sent) == 2
    acts = feed(lay, UPSTREAM, rowdesc("v") + m.data_row([b"a"]) + m.frame(b"C", b"SELECT 1\0")
                             + m.frame(b"C", b"UPDATE 3\0") + m.ready_for_query())
    first, second = outputs(acts)
    assert first.stop == sent[0] and second.stop == sent[1]
    assert first.fields["columns"] == ["v"] and first.fields["sample"] == [["a"]]
    assert first.fields["rows_returned"] == 1
    assert second.fields["rows_affected"] == 3 and "sample" not in second.fields


def test_an_error_in_a_pipeline_skips_the_rest_of_its_sync_group():
    lay = layer()
    batch = b"".join([m.frame(b"P", b"\0SELECT 1\0\0\0"), m.frame(b"B", b"\0\0\0\0\0\0\0\0"),
                      m.frame(b"E", b"\0\0\0\0\0"), m.frame(b"E", b"\0\0\0\0\0"), m.frame(b"S"),
                      m.frame(b"E", b"\0\0\0\0\0"), m.frame(b"S")])
    sent = starts(feed(lay, CLIENT, batch))
    assert len(sent) == 3
    err = m.error_response("division by zero", "22012")
    acts = feed(lay, UPSTREAM, m.frame(b"1") + m.frame(b"2") + err + m.ready_for_query()
                             + m.frame(b"C", b"SELECT 1\0") + m.ready_for_query())
    failed, ok = outputs(acts)
    assert failed.stop == sent[0] and failed.fields["sqlstate"] == "22012"
    assert ok.stop == sent[2]            # the second Execute was skipped by the server


def test_samples_are_bounded_per_statement_and_per_session():
    lay = layer(SampleLimits(rows=2, bytes=4096, session_bytes=10))
    feed(lay, CLIENT, m.frame(b"Q", b"SELECT v FROM t\0"))
    rows = b"".join(m.data_row([b"abc"]) for _ in range(5))
    (out,) = outputs(feed(lay, UPSTREAM, rowdesc("v") + rows + m.frame(b"C", b"SELECT 5\0")
                                       + m.ready_for_query()))
    assert out.fields["sample"] == [["abc"], ["abc"]] and out.fields["sample_truncated"]
    assert out.fields["rows_returned"] == 5
    feed(lay, CLIENT, m.frame(b"Q", b"SELECT v FROM t\0"))
    (out,) = outputs(feed(lay, UPSTREAM, rowdesc("v") + rows + m.frame(b"C", b"SELECT 5\0")
                                       + m.ready_for_query()))
    assert out.fields["sample_capped"] and "sample" not in out.fields   # budget spent
    assert out.fields["rows_returned"] == 5


def test_a_denied_statement_has_no_output_of_its_own():
    from hostagent.policy import Rule
    policy = Policy(rules=(Rule(name="no-drop", action="deny", matchers=(("statements", ("DROP",)),)),))
    lay = ready_layer(policy)
    token_q = [a for a in feed(lay, CLIENT, m.frame(b"Q", b"DROP TABLE t\0"))
               if isinstance(a, ToUpstream)][0]
    token = token_q.data[5:-1].decode()
    acts = feed(lay, UPSTREAM, m.error_response(f'syntax error at or near "{token}"', "42601")
                             + m.ready_for_query())
    assert outputs(acts) == []
