"""The PostgreSQL layer on its own: any bytes from a client end in a ProtocolError at
worst (the driver closes that session only), never another exception."""
from hypothesis import given, settings
from hypothesis import strategies as st

from hostagent.policy import Policy, decide
from hostagent.protocols import ProtocolError
from hostagent.protocols.postgres import messages as m
from hostagent.protocols.postgres.layer import PostgresLayer


def ready_layer() -> PostgresLayer:
    layer = PostgresLayer(decide=lambda r: decide(Policy(), r), target="t", user="app",
                          password="pw")
    layer.client_data(m.startup_message({"user": "x", "database": "d"}))
    layer.upstream_data(m.authentication(m.AUTH_OK) + m.frame(b"K", b"\0\0\0\1\0\0\0\2")
                        + m.ready_for_query())
    return layer


@settings(max_examples=300)
@given(st.lists(st.tuples(st.sampled_from(b"QPBDESHFXCdcfp"), st.binary(max_size=60)),
                max_size=6))
def test_malformed_client_messages_raise_only_protocol_errors(msgs):
    layer = ready_layer()
    data = b"".join(m.frame(bytes([k]), body) for k, body in msgs)
    try:
        layer.client_data(data)
    except ProtocolError:
        pass


@settings(max_examples=200)
@given(st.binary(max_size=120))
def test_truncated_or_garbage_startup_raises_only_protocol_errors(data):
    layer = PostgresLayer(decide=lambda r: decide(Policy(), r), target="t")
    try:
        layer.client_data(data)
    except ProtocolError:
        pass


def test_the_agent_gets_a_stand_in_backend_key():
    layer = ready_layer()
    (fake, real), = layer.cancel_keys.items()
    assert real == (1, 2) and fake != real
    layer.close()
    assert layer.cancel_keys == {}
