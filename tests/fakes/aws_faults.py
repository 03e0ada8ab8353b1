"""A fault-injecting HTTP proxy in front of moto server, for EC2 errors moto
cannot produce by itself (capacity, spot limits), and for the operator's IAM policy,
which moto does not enforce.

Every request is forwarded unchanged to moto, except EC2 Query-API calls that
match a rule: those are answered with EC2's real error document
(`<Response><Errors><Error><Code>…`) and the rule's HTTP status, so botocore
parses a genuine error response off the wire. Every EC2 request's form
parameters are recorded in `requests`, so a test can check what the client
actually sent. S3's REST calls pass too (path-style; a chunked body is forwarded
de-chunked), so the operator's store traffic can be judged here as well.

With `enforce(policy)` every request (EC2, IAM, STS and S3) is first judged as AWS
would judge it under that identity policy (tests/fakes/aws_operator.py): a refused
one is answered 403 with the service's own AccessDenied / UnauthorizedOperation
document and listed in `denied()`.

    proxy = FaultProxy("http://127.0.0.1:5000")   # starts on 127.0.0.1:<free port>
    proxy.fail("RunInstances", "SubnetId", {"subnet-123"}, "InsufficientInstanceCapacity")
    proxy.delay("RunInstances", 5.0)   # hold each RunInstances 5 s, then forward it
    proxy.hold("RunInstances")         # hold each RunInstances until release("RunInstances")
    proxy.answer("GetConsoleOutput", fn)  # answer it with fn(params) -> XML body (moto has none)
    proxy.enforce(user_policy("my-runs"))  # judge every call (tests/fakes/aws_operator.py)
    proxy.denied()                     # [{"call", "service", "checks", "allowed", "why"}] refused
    ... boto3 with AWS_ENDPOINT_URL=proxy.url ...
    proxy.close()
"""

from __future__ import annotations

import http.client
import threading
import time
import uuid
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

from tests.fakes.bodies import read_body

HOP_HEADERS = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "te", "upgrade"}


@dataclass
class Rule:
    action: str
    param: str
    values: frozenset[str]
    code: str
    status: int
    let_through: int  # matching requests forwarded before the rule starts failing
    times: int | None  # how many it fails before forwarding again (None: for ever)
    seen: int = 0


def error_xml(code: str, message: str) -> bytes:
    return (f'<?xml version="1.0" encoding="UTF-8"?>\n<Response><Errors><Error><Code>{code}</Code>'
            f"<Message>{message}</Message></Error></Errors>"
            f"<RequestID>{uuid.uuid4()}</RequestID></Response>").encode()


class FaultProxy:
    def __init__(self, upstream: str):
        up = urlsplit(upstream)
        self.upstream_url, self.upstream = upstream, (up.hostname, up.port)
        self.enforcer = None  # an aws_operator.OperatorPolicy, once enforce() is called
        self.rules: list[Rule] = []
        self.delays: dict[str, float] = {}  # action -> seconds held before forwarding
        self.holds: dict[str, threading.Event] = {}  # action -> set when released
        self.forwarded: list[str] = []  # actions of delayed requests once moto answered them
        self.requests: list[dict[str, str]] = []  # EC2 form params, in order
        self.answers: dict[str, object] = {}  # action -> fn(params) -> XML body, answered here
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def fail(self, action: str, param: str, values, code: str, status: int = 500,
             let_through: int = 0, times: int | None = None) -> None:
        """Answer `action` with error `code` whenever form parameter `param` is
        one of `values`: after `let_through` such calls, for `times` calls."""
        with self.lock:
            self.rules.append(Rule(action, param, frozenset(values), code, status, let_through, times))

    def delay(self, action: str, seconds: float) -> None:
        """Hold every `action` request this long before forwarding it: a window in
        which a client can die with its request in flight (the call still lands)."""
        with self.lock:
            self.delays[action] = seconds

    def hold(self, action: str) -> None:
        """Hold every `action` request until `release(action)`: a window, as long as
        the test needs, in which a client can die with its request in flight."""
        with self.lock:
            self.holds[action] = threading.Event()

    def answer(self, action: str, fn) -> None:
        """Answer every `action` here with `fn(params)` (an XML body, status 200)
        instead of forwarding it: what moto does not do (a booted node's console)."""
        with self.lock:
            self.answers[action] = fn

    def enforce(self, *documents: dict) -> None:
        """From now on, judge every request under these identity policies as AWS would
        (tests/fakes/aws_operator.py): a refused one never reaches moto."""
        from tests.fakes.aws_operator import OperatorPolicy

        self.enforcer = OperatorPolicy(self.upstream_url, list(documents))

    def denied(self) -> list[dict]:
        """The calls `enforce` refused, in order."""
        return self.enforcer.denied() if self.enforcer is not None else []

    def release(self, action: str) -> None:
        """Forward the held `action` requests (and any later ones at once)."""
        with self.lock:
            gate = self.holds.pop(action, None)
        if gate is not None:
            gate.set()

    def reset(self) -> None:
        for action in list(self.holds):
            self.release(action)
        with self.lock:
            self.rules.clear()
            self.delays.clear()
            self.forwarded.clear()
            self.requests.clear()

    def calls(self, action: str) -> list[dict[str, str]]:
        with self.lock:
            return [r for r in self.requests if r.get("Action") == action]

    def close(self) -> None:
        for action in list(self.holds):
            self.release(action)
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)

    def _match(self, params: dict[str, str], refused: bool = False) -> Rule | None:
        with self.lock:
            if "Action" in params and "Version" in params:
                self.requests.append(params)
            for rule in [] if refused else self.rules:
                if params.get("Action") == rule.action and params.get(rule.param) in rule.values:
                    rule.seen += 1
                    failed = rule.seen - rule.let_through
                    if failed > 0 and (rule.times is None or failed <= rule.times):
                        return rule
        return None

    def _handler(self):
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _body(self) -> bytes:
                return read_body(self)

            def _relay(self):
                body = self._body()
                form = parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True) \
                    if "x-www-form-urlencoded" in self.headers.get("Content-Type", "") else {}
                params = {k: v[0] for k, v in form.items()}
                refusal = None
                if proxy.enforcer is not None:
                    parts = urlsplit(self.path)
                    refusal = proxy.enforcer.judge(self.command, parts.path, parts.query, self.headers,
                                                   body, params)
                rule = proxy._match(params, refused=refusal is not None)
                if refusal is not None:
                    status, payload = refusal
                    self.send_response(status)
                    self.send_header("Content-Type", "text/xml;charset=UTF-8")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(payload)
                    return
                if rule is not None:
                    payload = error_xml(rule.code, f"injected {rule.code} for {rule.param}")
                    self.send_response(rule.status)
                    self.send_header("Content-Type", "text/xml;charset=UTF-8")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                answer = proxy.answers.get(params.get("Action", ""))
                if answer is not None:
                    payload = answer(params)
                    self.send_response(200)
                    self.send_header("Content-Type", "text/xml;charset=UTF-8")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                held = proxy.delays.get(params.get("Action", ""), 0.0)
                gate = proxy.holds.get(params.get("Action", ""))
                if held:
                    time.sleep(held)
                if gate is not None:
                    gate.wait(600)
                conn = http.client.HTTPConnection(*proxy.upstream, timeout=60)
                try:
                    headers = {k: v for k, v in self.headers.items()
                               if k.lower() not in HOP_HEADERS | {"content-length", "expect"}}
                    conn.request(self.command, self.path, body=body, headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                finally:
                    conn.close()
                if held or gate is not None:
                    with proxy.lock:
                        proxy.forwarded.append(params["Action"])
                try:
                    self.send_response(resp.status)
                    head = self.command == "HEAD"  # its Content-Length is the object's, kept
                    for k, v in resp.getheaders():
                        if k.lower() not in HOP_HEADERS | ({"content-length"} if not head else set()):
                            self.send_header(k, v)
                    if not head:
                        self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    self.close_connection = True  # the client died while its call was held

            do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = _relay

        return Handler
