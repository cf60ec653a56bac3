"""NBD URIs (the NBD project's doc/uri.md) and the nbd:URI LUN spec."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vscsi.scsi.nbd.uri import DEFAULT_PORT, NbdUri, NbdUriError, parse_nbd_uri
from vscsi.scsi.spec import LunSpecError, format_lun_spec, parse_lun_spec


@pytest.mark.parametrize("text, expected", [
    ("nbd://example.com/disk", NbdUri("disk", host="example.com")),
    ("nbd://example.com", NbdUri("", host="example.com")),
    ("nbd://example.com/", NbdUri("", host="example.com")),
    ("nbd://10.0.0.1:10810/a%2Fb%20c", NbdUri("a/b c", host="10.0.0.1", port=10810)),
    ("nbd://[::1]:1234/x", NbdUri("x", host="::1", port=1234)),
    ("nbd+unix:///d0?socket=/tmp/q.sock", NbdUri("d0", socket="/tmp/q.sock")),
    ("nbd+unix:///?socket=/tmp/q%20r.sock", NbdUri("", socket="/tmp/q r.sock")),
    ("NBD+UNIX:///d0?socket=s", NbdUri("d0", socket="s")),
])
def test_parse(text, expected):
    assert parse_nbd_uri(text) == expected


@pytest.mark.parametrize("text, message", [
    ("http://example.com/x", "expected nbd://"),
    ("nbds://example.com/x", "TLS"),
    ("nbds+unix:///x?socket=/s", "TLS"),
    ("nbd://example.com/x?tls-certificates=/etc", "TLS"),
    ("nbd+unix:///d0", "socket=PATH"),
    ("nbd+unix:///d0?socket=", "socket=PATH"),
    ("nbd+unix:///d0?socket=a&socket=b", "socket=PATH"),
    ("nbd+unix://host/d0?socket=/s", "takes no host"),
    ("nbd:///d0", "needs a host"),
    ("nbd://h:notaport/d0", "bad NBD URI"),
    ("nbd://h:99999/d0", "bad NBD URI"),
    ("nbd://h:0/d0", "port 0"),
    ("nbd://user@h/d0", "user information"),
    ("nbd://h/d0?socket=/s", "belongs to nbd\\+unix"),
    ("nbd://h/d0#frag", "fragment"),
    ("nbd://h/%ff", "not UTF-8"),
    ("nbd+unix:///d0?socket=%ff", "bad query"),
])
def test_refused(text, message):
    with pytest.raises(NbdUriError, match=message) as info:
        parse_nbd_uri(text)
    assert "\n" not in str(info.value)


_export = st.text(st.characters(blacklist_categories=("Cs",)), max_size=20)
_host = st.one_of(
    st.from_regex(r"[a-z][a-z0-9-]{0,10}(\.[a-z][a-z0-9]{0,5}){0,2}", fullmatch=True),
    st.ip_addresses().map(str),
)


@given(_export, _host, st.integers(1, 65535))
def test_tcp_round_trip(export, host, port):
    uri = NbdUri(export, host=host, port=port)
    assert parse_nbd_uri(str(uri)) == uri


@given(_export, st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\0"),
                        min_size=1, max_size=30))
def test_unix_round_trip(export, path):
    uri = NbdUri(export, socket=path)
    assert parse_nbd_uri(str(uri)) == uri


@given(st.text(max_size=60))
def test_never_crashes(text):
    try:
        uri = parse_nbd_uri(text)
    except NbdUriError as e:
        assert "\n" not in str(e)
    else:
        assert (uri.socket is None) != (uri.host is None)
        assert uri.port == DEFAULT_PORT or 0 < uri.port < 65536


def test_lun_spec():
    spec = parse_lun_spec("0:1=nbd:nbd+unix:///d0?socket=/tmp/q.sock,ro,block-size=4096")
    assert (spec.kind, spec.arg, spec.size, spec.read_only, spec.block_size) == \
        ("nbd", "nbd+unix:///d0?socket=/tmp/q.sock", None, True, 4096)
    assert parse_lun_spec(format_lun_spec(spec)) == spec
    # A comma in the URI is doubled, as in paths.
    spec = parse_lun_spec("0:0=nbd:nbd+unix:///a,,b?socket=/s")
    assert parse_nbd_uri(spec.arg).export == "a,b"
    assert parse_lun_spec(format_lun_spec(spec)) == spec


@pytest.mark.parametrize("text, message", [
    ("0:0=nbd:", "needs a URI"),
    ("0:0=nbd:http://x/y", "expected nbd://"),
    ("0:0=nbd:nbd+unix:///d0", "socket=PATH"),
])
def test_lun_spec_refused(text, message):
    with pytest.raises(LunSpecError, match=message):
        parse_lun_spec(text)


@pytest.mark.parametrize("uri", ["nbd://localhost:10809/d0", "nbd://[::1]/e",
                                 "nbd+unix:///d0?socket=/run/q.sock"])
def test_an_nbd_uri_is_a_spec_of_its_own(uri: str) -> None:
    short = parse_lun_spec(f"0:1={uri},ro")
    assert short == parse_lun_spec(f"0:1=nbd:{uri},ro")
    assert short.kind == "nbd" and short.arg == uri and short.read_only
    assert str(short) == f"0:1=nbd:{uri},ro"            # written out in the long form
    with pytest.raises(LunSpecError, match="socket=PATH"):
        parse_lun_spec("0:0=nbd+unix:///d0")              # checked the same way
