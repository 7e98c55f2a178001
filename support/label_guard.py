"""Which requests label.py's server takes: from its own page only. Host and Origin must be its own
address (DNS rebinding and other sites' pages are refused), a change must be JSON with the token of the
printed address, and its body no longer than a long stroke needs."""
import ipaddress
import secrets

LOOPBACK = {"127.0.0.1", "localhost", "::1"}
BODY = 256_000  # bytes of one change: a stroke of label.VERTICES vertices fits, with room


def listen_on(server, host, token):
    """Give `server` the addresses it answers to and its token -> whether `host` is loopback only."""
    host = host.lower()
    server.everywhere, loopback = host in ("", "0.0.0.0"), host in LOOPBACK or host.startswith("127.")
    server.names = {host} | (LOOPBACK if loopback or server.everywhere else set())
    server.token = token
    return loopback


def refusal(headers, server, write):
    """-> why a request is not from this server's page, or None. Host must be this server's address
    (DNS rebinding sends a name of the attacker's); Origin too, when sent (another site's page sends
    its own); a change must be JSON (a form cannot send that) and carry the token of the printed address."""
    host, origin = headers.get("Host", ""), headers.get("Origin")
    if not ours(host, server):
        return f"Host {host!r} is not this server's address"
    if origin is not None and not (origin.startswith("http://") and ours(origin[7:], server)):
        return f"Origin {origin!r} is not this server's page"
    if write and headers.get_content_type() != "application/json":
        return "a change is JSON (Content-Type: application/json)"
    given = headers.get("X-Token", "").encode("latin-1")
    if write and not secrets.compare_digest(given, server.token.encode()):
        return "no token, or another start's: open the address label.py printed"
    return None


def ours(address, server):
    """Is `address` (host:port, as Host and Origin give it) this server's? Its port, and a loopback name
    (on a loopback server), the --host given, or on 0.0.0.0 any IP address: never another name, which
    is what DNS rebinding sends."""
    name, _, port = address.lower().rpartition(":")
    if port != str(server.server_address[1]):
        return False
    try:
        return name.strip("[]") in server.names or server.everywhere and bool(ipaddress.ip_address(name))
    except ValueError:
        return False


def body_length(headers):
    """-> (the body's length, None), or (None, (status, why)): no Content-Length (411), not a whole number
    (400), or more than BODY bytes (413)."""
    length = headers.get("Content-Length")
    if length is None:
        return None, (411, "a change says its Content-Length")
    if not (length.isascii() and length.isdigit()):
        return None, (400, f"Content-Length {length!r}: not a whole number")
    if int(length) > BODY:
        return None, (413, f"Content-Length {length}: a change is one click or stroke, at most {BODY} bytes")
    return int(length), None
