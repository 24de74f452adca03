"""The prefilter (hostagent/masking/prefilter.py) only ever spares values no detector
would match, and its compiled twin says exactly what the Python one says."""
from hypothesis import given, settings
from hypothesis import strategies as st

from hostagent.masking import DETECTORS, Masker, MaskRule, prefilter
from hostagent.masking.prefilter import Prefilter, py_might_match

SAMPLES = ["mail bob@example.com", "card 4111 1111 1111 1111", "4111-1111-1111-1111",
           "ssn 123-45-6789", "call +1 415 555 0100", "(415) 555-0100", "1 (415) 555.0100",
           "+44.20.7946.0958", "key AKIAABCDEFGHIJKLMNOP", "Authorization: BeArEr "
           "abcdefghijklmnop123", "eyJhbGciOi.eyJzdWIiOi.c2lnbmF0dXJl",
           "-----BEGIN RSA PRIVATE KEY-----\nMIIB\n-----END RSA PRIVATE KEY-----",
           "2026-11-24 03:00:00.123+00", "5d41402abc4b2a76b9719d911017c592", "4155550100",
           "4111111111111111", "4222222222222", "no secrets", "é bob@x.org", "٤١٥٥٥٥٠١٠٠"]
ALPHABET = st.sampled_from(list("0123456789 -.()+@AKISeyJbearBEARERxz:/\t\x1f") + ["é", "٤"])
values = st.one_of(st.sampled_from(SAMPLES), st.text(ALPHABET, max_size=40),
                   st.builds(lambda a, s, b: a + s + b, st.text(ALPHABET, max_size=8),
                             st.sampled_from(SAMPLES), st.text(ALPHABET, max_size=8)))
detector_sets = st.sets(st.sampled_from(sorted(DETECTORS)), min_size=1)


def test_the_compiled_prefilter_is_built_and_used():
    assert prefilter.COMPILED, "make setup builds hostagent/masking/_prefilter.pyx"


@settings(max_examples=1500, deadline=None)
@given(values, detector_sets)
def test_a_value_the_prefilter_spares_has_nothing_any_detector_would_mask(text, names):
    raw = text.encode()
    p = Prefilter.for_detectors(names)
    spared = not py_might_match(raw, p)
    assert prefilter.might_match(raw, p) == (not spared)
    if spared:
        masker = Masker((MaskRule("r", detectors=tuple(sorted(names))),))
        assert masker.scan(text) == (text, 0), (text, names)


def test_what_the_prefilter_lets_through_and_spares():
    everything = Prefilter.for_detectors(DETECTORS)
    for text in SAMPLES[:12]:
        assert prefilter.might_match(text.encode(), everything), text
    cards = Prefilter.for_detectors(["credit_card"])
    assert not prefilter.might_match(b"2026-11-24 03:00:00.123+00", cards)
    assert not prefilter.might_match(b"5d41402abc4b2a76b9719d911017c592", cards)
    assert prefilter.might_match("٤١٥٥".encode(), cards)       # Unicode digits: \d


def test_a_repeated_value_is_masked_and_counted_every_time():
    masker = Masker((MaskRule("pii", detectors=("credit_card", "email")),))
    for _ in range(3):
        assert masker.scan_bytes(b"card 4111 1111 1111 1111 to a@b.io") == b"card **** to ****"
    assert masker.counts == {"pii:credit_card": 3, "pii:email": 3}
