"""label.py's web server: which requests it takes (from its own page only: Host and Origin must be
its own address, so DNS rebinding and other sites' pages are refused; a change must be JSON with the
token of the printed address, its body no longer than a long stroke needs) and how it answers each."""
import errno
import ipaddress
import json
import secrets
from http.server import BaseHTTPRequestHandler
from pathlib import Path

from support.cli import DataError
from support.label_file import number

LOOPBACK = {"127.0.0.1", "localhost", "::1"}
PAGE = Path(__file__).parent / "label.html"
SCRIPT = PAGE.with_suffix(".js")  # the page's script, a file of its own: the policy below runs no inline one
# what the page may do (Content-Security-Policy): run this server's script and nothing else (no inline
# script or handler, so a name that reached the page as HTML would run nothing), talk to this server only,
# and never show inside another site's page
POLICY = ("default-src 'none'; script-src 'self'; connect-src 'self'; img-src 'self' data:; "
          "style-src 'unsafe-inline'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
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


class Handler(BaseHTTPRequestHandler):
    """GET /, /label.js, /state, /image/I, /map/I, /suggestions/I; POST /change, from this server's page
    only (else a 403). No such page: 404, a bad request: 400, an image that cannot be read or held in
    memory: 422, a file on disk that is no longer readable: 409, a change the disk refuses: 507; one log
    line each."""
    timeout = 60  # a client that stops sending mid-request frees its thread

    def do_GET(self):
        labels, parts = self.server.labels, self.path.split("?")[0].strip("/").split("/")
        if not self.accepted(write=False):
            return
        i = number(parts[1]) if len(parts) == 2 else None
        known = i is not None and i < len(labels.files)
        try:
            if parts == [""]:
                return self.reply(PAGE.read_bytes(), "text/html; charset=utf-8")
            if parts == ["label.js"]:
                return self.reply(SCRIPT.read_bytes(), "text/javascript; charset=utf-8")
            if parts == ["state"]:
                return self.reply(json.dumps(labels.state()).encode(), "application/json")
            if parts[0] == "image" and known:
                return self.reply(labels.shown(i), "image/jpeg")
            if parts[0] in ("map", "suggestions") and known and labels.model:
                picture, hints = labels.mapped(i)
                return self.reply(picture, "image/png") if parts[0] == "map" else \
                    self.reply(json.dumps(hints).encode(), "application/json")
        except DataError as e:  # an image of the folder that cannot be read
            return self.send_error(422, str(e))
        except MemoryError:  # a header that declares more pixels than this machine holds: this image only
            (w, h), _ = labels.info[labels.files[i][0]] if known else ((0, 0), None)
            where = labels.files[i][1] if known else self.path
            return self.send_error(422, f"{where}: {w}x{h} pixels, more than the memory free")
        self.send_error(404, "no such page or image")

    def do_POST(self):
        if not self.accepted(write=True):
            return
        if self.path != "/change":
            return self.send_error(404, "no such page")
        length, refused = body_length(self.headers)
        if refused:
            return self.send_error(*refused)
        body = self.rfile.read(length)
        try:
            saved = self.server.labels.change(json.loads(body))
        except (ValueError, KeyError, TypeError, RecursionError) as e:  # not JSON, or not a click here
            return self.send_error(400, f"bad change: {e}")
        except DataError as e:  # the clicks file, changed on disk, or the image no longer readable
            return self.send_error(409, f"not saved: {e}")
        except OSError as e:  # a full disk: nothing changed, in the file or in memory
            full = e.errno in (errno.ENOSPC, errno.EDQUOT)
            return self.send_error(507 if full else 500, f"not saved: {e.strerror or e}")
        self.reply(json.dumps(saved).encode(), "application/json")

    def accepted(self, write):
        """-> whether this server takes the request; if not, its 4xx is sent."""
        if not self.path.isascii():
            self.send_error(400, "the path is not ASCII")
            return False
        why = refusal(self.headers, self.server, write)
        if why:
            self.send_error(403, f"refused: {why}")
        return why is None

    def end_headers(self):  # every answer, an error page too, carries the page's policy
        self.send_header("Content-Security-Policy", POLICY)
        super().end_headers()

    def reply(self, body, kind):
        self.send_response(200)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def send_error(self, code, message=None, explain=None):  # a reason phrase is Latin-1: keep it ASCII
        super().send_error(code, message.encode("ascii", "backslashreplace").decode(), explain)

    def log_error(self, format, *args):  # send_error's reason: said on the request's own line below
        self.reason = format % args

    def log_request(self, code="-", size="-"):
        self.log_message('"%s" %s %s', self.requestline, code, getattr(self, "reason", ""))
