"""The BPF maps' address keys, made from the strings sockets give (no kernel needed)."""
import ipaddress
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hostagent.intercept.loader import addr_key, key_to_addr


def reference(host: str, port: int) -> tuple[list[int], int]:
    """What the keys were made with before (the ipaddress module)."""
    ip = ipaddress.ip_address(host)
    if ip.version == 4:
        ip = ipaddress.IPv6Address(f"::ffff:{ip}")
    return list(struct.unpack("=4I", ip.packed)), struct.unpack("=H", struct.pack("!H", port))[0]


@given(st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6)), st.integers(0, 65535))
def test_keys_are_the_addresses_in_network_order_and_come_back_unchanged(ip, port):
    k = addr_key(str(ip), port)
    assert (list(k.addr), k.port) == reference(str(ip), port)
    mapped = getattr(ip, "ipv4_mapped", None)
    assert key_to_addr(k) == (str(mapped or ip), port)


@pytest.mark.parametrize("host", ["1.2.3", "localhost", "::g", "1.2.3.4.5", ""])
def test_what_is_not_an_address_is_refused(host):
    with pytest.raises(ValueError):
        addr_key(host, 1)
