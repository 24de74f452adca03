from dataclasses import replace

from agentgate.events import GENESIS, make_event, pack_payload, verify_chain


def chain(n=5, sid="s"):
    prev, out = GENESIS, []
    for i in range(1, n + 1):
        ev = make_event(sid, i, 1000 + i, i, "command", pack_payload({"text": f"q{i}"}), prev)
        out.append(ev)
        prev = ev.hash
    return out


def test_intact_chain_verifies():
    evs = chain()
    r = verify_chain(evs)
    assert r.ok and r.count == 5 and r.head == evs[-1].hash


def test_edited_payload_is_detected():
    evs = chain()
    evs[2] = replace(evs[2], payload=pack_payload({"text": "q3 edited"}))
    r = verify_chain(evs)
    assert not r.ok and r.broken_seq == 3 and "altered" in r.problem


def test_rehashed_edit_breaks_the_next_link():
    evs = chain()
    e = evs[2]
    evs[2] = make_event(e.session_id, e.seq, e.wall_time_ns, e.mono_ns, e.kind,
                        pack_payload({"text": "forged"}), e.prev_hash)
    r = verify_chain(evs)
    assert not r.ok and r.broken_seq == 4 and "link" in r.problem


def test_missing_and_reordered_events_are_detected():
    evs = chain()
    assert verify_chain(evs[:2] + evs[3:]).broken_seq == 3
    r = verify_chain([evs[1], evs[0]] + evs[2:])
    assert not r.ok and r.broken_seq == 1


def test_first_event_must_start_at_genesis():
    evs = chain()
    assert not verify_chain(evs[1:]).ok


def test_every_kind_the_host_agent_records_is_declared():
    """Producers may not invent kinds the collector, replay and export don't know."""
    import re
    from pathlib import Path

    from agentgate import events
    from hostagent.intercept.loader import EVENT_NAMES
    root = Path(__file__).resolve().parent.parent / "hostagent"
    used = set(EVENT_NAMES.values())
    for path in root.rglob("*.py"):
        text = path.read_text()
        used |= set(re.findall(r'(?:Record|record)\("([a-z_]+)"', text))
        used |= {getattr(events, c) for c in re.findall(r'(?:Record|record)\(([A-Z_]+)\b', text)}
    assert used and used <= set(events.EVENT_KINDS), used - set(events.EVENT_KINDS)


def test_an_event_made_here_carries_the_frame_packing_it_would_give():
    """make_event packs the stored form once (the chain's array, the hash after it,
    framed): it must be byte for byte what packing the event would give."""
    import msgpack
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from agentgate.events import Event, make_event
    from agentgate.frames import encode_frame

    @settings(max_examples=300, deadline=None)
    @given(st.text(max_size=80), st.integers(1, 2**63 - 1), st.integers(0, 2**63 - 1),
           st.integers(-2**63, 2**63 - 1), st.text(max_size=30), st.binary(max_size=300),
           st.binary(min_size=32, max_size=32))
    def check(sid, seq, wall, mono, kind, payload, prev):
        ev = make_event(sid, seq, wall, mono, kind, payload, prev)
        assert ev.frame[8:] == msgpack.packb(ev.as_tuple(), use_bin_type=True)
        assert ev.frame == encode_frame(Event(*ev.as_tuple()))
    check()
