"""GCP's Security Token Service for AWS workload identity federation, for tests.

`GcpSts` serves `POST /v1/token` (RFC 8693 token exchange, as sts.googleapis.com does)
on 127.0.0.1:<free port>. It accepts a subject token of type
`urn:ietf:params:aws:token-type:aws4_request` — a serialized, SigV4-signed AWS STS
GetCallerIdentity request, what google-auth's `external_account` credentials (and the
node boot fetch, infra/boot.sh.tmpl) send — only when

- the audience is one of `providers` (a pool provider's full resource name), and the
  request carries it in `x-goog-cloud-target-resource` too;
- it is a POST of Action=GetCallerIdentity&Version=2011-06-15 to an AWS STS host;
- its access key is one the AWS stand-in issued (`credentials_of(key_id)` -> the
  tests/fakes/ec2_imds.py `Imds` whose instance profile holds it, e.g.
  `Ec2Booter.issued_to`), its session token is that key's, its x-amz-date is within 15
  minutes, host / x-amz-date / x-amz-security-token are signed, and the SigV4
  signature verifies with that key's secret;
- the key's account is the one the provider trusts.

What AWS STS would answer for that call — the caller is
`arn:aws:sts::ACCOUNT:assumed-role/ROLE/INSTANCE` — maps, as GCP's default AWS
attribute mapping does, to `attribute.aws_role` = `arn:aws:sts::ACCOUNT:assumed-role/ROLE`.
The answer is a federated access token; `token_info(token)` gives the stand-in GCS
(tests/fakes/gcs_identity.py) its principal as a bucket IAM member would name it,
`principalSet://iam.googleapis.com/projects/N/locations/global/workloadIdentityPools/
POOL/attribute.aws_role/ARN`, so the bucket's policy decides. Anything else is refused
with STS's OAuth error document (400 invalid_grant / invalid_target / invalid_request),
which google-auth raises as an OAuthError. `calls` records each exchange as
{"audience", "key_id", "role", "ok", "why"}.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import threading
import time
from collections.abc import Callable
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qsl, unquote, urlsplit

from tests.fakes.ec2_imds import serve_in_thread

AWS4_REQUEST = "urn:ietf:params:aws:token-type:aws4_request"
TOKEN_EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"
ACCESS_TOKEN = "urn:ietf:params:oauth:token-type:access_token"
CALLER_IDENTITY = [("Action", "GetCallerIdentity"), ("Version", "2011-06-15")]
SKEW_S = 15 * 60


class Refused(Exception):
    def __init__(self, error: str, why: str):
        super().__init__(why)
        self.error = error


def principal_set(audience: str, aws_role: str) -> str:
    """The bucket IAM member for every token of `aws_role` federated through the pool of
    the provider `audience`."""
    pool = audience.split("/providers/", 1)[0].removeprefix("//")
    return f"principalSet://{pool}/attribute.aws_role/{aws_role}"


def sigv4_signature(secret: str, method: str, path: str, query: str, headers: dict[str, str],
                    signed: list[str], stamp: str, scope: str, payload: bytes = b"") -> str:
    """The SigV4 signature of a request (header names lower case), for `scope`
    DATE/REGION/SERVICE/aws4_request."""
    canonical = "\n".join([method, path or "/", query,
                           "".join(f"{k}:{' '.join(headers[k].split())}\n" for k in signed),
                           ";".join(signed), hashlib.sha256(payload).hexdigest()])
    to_sign = "\n".join(["AWS4-HMAC-SHA256", stamp, scope,
                         hashlib.sha256(canonical.encode()).hexdigest()])
    key = ("AWS4" + secret).encode()
    for part in scope.split("/"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    return hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()


class GcpSts:
    """GCP STS on 127.0.0.1:<free port>; `url` is its token endpoint (what the node's
    GEOTRAIN_GCP_STS_URL names). `providers` maps a pool provider's resource name to the
    AWS account id it trusts."""

    def __init__(self, credentials_of: Callable[[str], object | None], providers: dict[str, str],
                 token_lifetime_s: int = 3600):
        self.credentials_of, self.providers = credentials_of, dict(providers)
        self.token_lifetime_s = token_lifetime_s
        self.calls: list[dict] = []
        self.tokens: dict[str, dict] = {}  # access token -> what token_info answers
        self.lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/v1/token"
        self._thread = serve_in_thread(self._server, "gcp-sts")

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def token_info(self, token: str) -> dict | None:
        """{"email": the principal set member, "scope", "instance", "subject"} of a token
        this STS issued and that has not expired; else None."""
        with self.lock:
            info = self.tokens.get(token)
        return dict(info) if info and info["expires"] > time.time() else None

    def verify(self, audience: str, subject_token: str) -> tuple[object, str]:
        """(the issuing Imds, the caller's ARN) of a serialized signed GetCallerIdentity
        request, or Refused."""
        try:
            request = json.loads(unquote(subject_token))
            url, method = urlsplit(request["url"]), request["method"]
            headers = {h["key"].lower(): h["value"] for h in request["headers"]}
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise Refused("invalid_grant", f"The subject token is not a serialized AWS request ({e})")
        if headers.get("x-goog-cloud-target-resource") != audience:
            raise Refused("invalid_grant", "The x-goog-cloud-target-resource header does not match "
                          "the audience")
        if method != "POST" or not (url.hostname or "").startswith("sts") or \
                not (url.hostname or "").endswith(".amazonaws.com") or \
                sorted(parse_qsl(url.query)) != CALLER_IDENTITY:
            raise Refused("invalid_grant", "The subject token is not an AWS STS GetCallerIdentity "
                          f"request ({method} {request['url']})")
        fields = dict(part.strip().split("=", 1) for part in
                      headers.get("authorization", "").removeprefix("AWS4-HMAC-SHA256 ").split(",")
                      if "=" in part)
        key_id, _, scope = fields.get("Credential", "").partition("/")
        signed = fields.get("SignedHeaders", "").split(";")
        imds = self.credentials_of(key_id) if key_id else None
        creds = getattr(imds, "credentials", None) or {}
        if creds.get("AccessKeyId") != key_id:
            raise Refused("invalid_grant", "The security token included in the request is invalid "
                          "(no such access key)")
        if not {"host", "x-amz-date", "x-amz-security-token"} <= set(signed) or \
                any(h not in headers for h in signed) or signed != sorted(signed):
            raise Refused("invalid_grant", "The AWS request must sign host, x-amz-date and "
                          "x-amz-security-token")
        if headers["x-amz-security-token"] != creds.get("Token") or headers["host"] != url.hostname:
            raise Refused("invalid_grant", "The security token included in the request is invalid")
        try:
            at = datetime.strptime(headers["x-amz-date"], "%Y%m%dT%H%M%SZ").replace(tzinfo=timezone.utc)
        except ValueError:
            raise Refused("invalid_grant", "x-amz-date is not YYYYMMDDTHHMMSSZ") from None
        if abs(at.timestamp() - time.time()) > SKEW_S or not scope.startswith(at.strftime("%Y%m%d/")) \
                or not scope.endswith("/sts/aws4_request"):
            raise Refused("invalid_grant", "Signature expired or its scope does not match its date")
        want = sigv4_signature(creds["SecretAccessKey"], method, url.path, url.query, headers,
                               signed, headers["x-amz-date"], scope)
        if not hmac.compare_digest(want, fields.get("Signature", "")):
            raise Refused("invalid_grant", "The request signature we calculated does not match the "
                          "signature you provided")
        if imds.account_id != self.providers[audience]:
            raise Refused("invalid_grant", f"AWS account {imds.account_id} is not the one the "
                          "provider trusts")
        return imds, f"arn:aws:sts::{imds.account_id}:assumed-role/{imds.role}/{imds.instance_id}"

    def exchange(self, form: dict[str, str]) -> tuple[int, dict]:
        audience = form.get("audience", "")
        call = {"audience": audience, "key_id": None, "role": None, "ok": False, "why": None}
        try:
            if form.get("grant_type") != TOKEN_EXCHANGE or \
                    form.get("requested_token_type") != ACCESS_TOKEN:
                raise Refused("invalid_request", "grant_type and requested_token_type must be a "
                              "token exchange for an access token")
            if form.get("subject_token_type") != AWS4_REQUEST:
                raise Refused("invalid_request", f"subject_token_type {form.get('subject_token_type')!r}"
                              " is not one this provider accepts")
            if audience not in self.providers:
                raise Refused("invalid_target", "The target service indicated by the \"audience\" "
                              "parameters is invalid. This might either be because the pool or "
                              "provider is disabled or deleted or because it doesn't exist.")
            imds, arn = self.verify(audience, form.get("subject_token", ""))
        except Refused as e:
            call["why"] = str(e)
            with self.lock:
                self.calls.append(call)
            return 400, {"error": e.error, "error_description": str(e)}
        aws_role = arn.rsplit("/", 1)[0]
        token = "ya29.fed-" + secrets.token_urlsafe(32)
        with self.lock:
            self.tokens[token] = {"email": principal_set(audience, aws_role), "subject": arn,
                                  "instance": imds.instance_id, "scope": form.get("scope", ""),
                                  "expires": time.time() + self.token_lifetime_s}
            self.calls.append(dict(call, key_id=imds.credentials["AccessKeyId"], role=imds.role,
                                   ok=True))
        return 200, {"access_token": token, "issued_token_type": ACCESS_TOKEN,
                     "token_type": "Bearer", "expires_in": self.token_lifetime_s}

    def _handler(self):
        sts = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0)).decode()
                if urlsplit(self.path).path != "/v1/token":
                    status, doc = 404, {"error": {"code": 404, "message": "Not Found"}}
                else:
                    status, doc = sts.exchange(dict(parse_qsl(body, keep_blank_values=True)))
                payload = json.dumps(doc).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json; charset=UTF-8")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        return Handler


def issued_by(booter) -> Callable[[str], object | None]:
    """`credentials_of` for the instances a tests/fakes/ec2_boot.py `Ec2Booter` runs: the
    live instance's Imds whose instance profile credentials carry the key id."""
    def credentials_of(key_id: str):
        for iid in booter.nodes():
            try:
                imds = booter.imds(iid)
            except KeyError:  # gone meanwhile
                continue
            if imds.credentials and imds.credentials["AccessKeyId"] == key_id:
                return imds
        return None
    return credentials_of
