"""Create an object only if it does not exist yet: the one primitive a lease on an object store needs.

- local folder: O_CREAT|O_EXCL|O_NOFOLLOW, written and fsynced under a temporary name first and then
  linked into place (`os.link` fails if the name exists), so a reader never sees half a lease;
- s3://: `PUT` with `If-None-Match: *` (S3 has honoured it since August 2024; 412 Precondition Failed
  when the key exists, 409 when a concurrent conditional write is in progress: both mean "not ours").
  pyarrow's S3 filesystem cannot send that header, so this module signs the one request itself
  (AWS Signature Version 4, the documented algorithm) and sends it with urllib. Endpoint, region and
  credentials are found as storage.py finds them: `output.storage_options` (endpoint_override, scheme,
  region, access_key, secret_key, session_token), then AWS_ENDPOINT_URL(_S3), AWS_REGION /
  AWS_DEFAULT_REGION, AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN, then botocore's
  credential chain (instance roles, profiles) when botocore is installed. No message shows a value.
"""
from __future__ import annotations

import datetime
import hashlib
import hmac
import os
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, urlsplit

from ...common import safefs
from ...errors import ConfigError
from ...read import storage

TIMEOUT_S = 30.0


def create(uri: str, data: bytes, options: dict[str, Any] | None = None, *, root: str | None = None) -> bool:
    """Write `data` at `uri` unless something is there already; True if this call created it."""
    scheme = urlsplit(uri).scheme if "://" in uri else ""
    if scheme == "s3":
        return _s3_put_if_absent(uri, data, options or {})
    if storage.is_remote(uri):
        raise ConfigError(f"a driver lease on {scheme}:// is not supported (conditional writes are implemented "
                          "for s3:// and local folders); use an s3:// or local output.dir with run.engine: ray",
                          key="output.dir")
    return _local_create(uri, data, root)


def delete(uri: str, options: dict[str, Any] | None = None) -> None:
    if storage.is_remote(uri):
        fs, path = storage.filesystem(uri, options)
        fs.delete_file(path)
    else:
        try:
            os.unlink(uri)
        except FileNotFoundError:
            pass


def _local_create(path: str, data: bytes, root: str | None) -> bool:
    folder = os.path.dirname(path)
    if root is not None:
        os.makedirs(root, exist_ok=True)
        safefs.ensure_dir(folder)  # never through a planted link
    else:
        os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".tmp-{uuid.uuid4().hex}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(tmp, path)  # atomic, and fails when the name exists (a link planted there included)
        return True
    except FileExistsError:
        return False
    finally:
        os.unlink(tmp)


# -- S3: one signed conditional PUT ---------------------------------------------------------------

def _s3_put_if_absent(uri: str, data: bytes, options: dict[str, Any]) -> bool:
    parts = urlsplit(uri)
    bucket, key = parts.netloc, parts.path.lstrip("/")
    url, host, path = _s3_address(bucket, key, options)
    region = options.get("region") or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") \
        or "us-east-1"
    access, secret, token = _credentials(options)
    now = datetime.datetime.now(datetime.UTC)
    headers = {"host": host, "if-none-match": "*", "x-amz-content-sha256": hashlib.sha256(data).hexdigest(),
               "x-amz-date": now.strftime("%Y%m%dT%H%M%SZ")}
    if token:
        headers["x-amz-security-token"] = token
    headers["authorization"] = sign_v4("PUT", path, "", headers, headers["x-amz-content-sha256"],
                                       SigningKey(access, secret, region), now)
    req = urllib.request.Request(url, data=data, method="PUT",
                                 headers={**{k: v for k, v in headers.items() if k != "host"},
                                          "content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=TIMEOUT_S) as resp:  # noqa: S310 - the configured endpoint
            resp.read()
        return True
    except urllib.error.HTTPError as exc:
        if exc.code in (409, 412):  # exists / a concurrent conditional write won
            return False
        detail = exc.read()[:300].decode("utf-8", "replace")
        raise OSError(f"conditional PUT of {uri} answered HTTP {exc.code}: {detail}") from None
    except urllib.error.URLError as exc:
        raise OSError(f"conditional PUT of {uri} failed: {exc.reason}") from None


def _s3_address(bucket: str, key: str, options: dict[str, Any]) -> tuple[str, str, str]:
    """(url, host, canonical path): path-style under an endpoint override, virtual-hosted on AWS."""
    endpoint = options.get("endpoint_override") or os.environ.get("AWS_ENDPOINT_URL_S3") \
        or os.environ.get("AWS_ENDPOINT_URL")
    quoted = quote(key, safe="/~-_.")
    if endpoint:
        ep = urlsplit(endpoint if "://" in endpoint else f"{options.get('scheme') or 'https'}://{endpoint}")
        path = f"/{bucket}/{quoted}"
        return f"{ep.scheme}://{ep.netloc}{path}", ep.netloc, path
    region = options.get("region") or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") \
        or "us-east-1"
    host = f"{bucket}.s3.{region}.amazonaws.com"
    return f"https://{host}/{quoted}", host, f"/{quoted}"


def _credentials(options: dict[str, Any]) -> tuple[str, str, str | None]:
    access = options.get("access_key") or os.environ.get("AWS_ACCESS_KEY_ID")
    secret = options.get("secret_key") or os.environ.get("AWS_SECRET_ACCESS_KEY")
    token = options.get("session_token") or os.environ.get("AWS_SESSION_TOKEN")
    if access and secret:
        return access, secret, token
    try:
        from botocore.session import get_session  # optional: instance roles, profiles, SSO
    except ImportError:
        get_session = None
    if get_session is not None:
        creds = get_session().get_credentials()
        if creds is not None:
            frozen = creds.get_frozen_credentials()
            return frozen.access_key, frozen.secret_key, frozen.token
    raise ConfigError("the Ray engine's driver lease on s3:// signs one conditional PUT itself and found no "
                      "credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or output.storage_options "
                      "access_key / secret_key), or install botocore for profiles and instance roles",
                      key="output.storage_options")


@dataclass(frozen=True)
class SigningKey:
    """Who signs, for which region and service (never shown by repr: the secret stays out of logs)."""

    access: str
    secret: str = field(repr=False)
    region: str = "us-east-1"
    service: str = "s3"


def sign_v4(method: str, path: str, query: str, headers: dict[str, str], payload_hash: str, key: SigningKey,
            now: datetime.datetime) -> str:
    """The Authorization header of AWS Signature Version 4 over `headers` (lower-case names)."""
    region, service, access, secret = key.region, key.service, key.access, key.secret
    names = sorted(headers)
    canonical_headers = "".join(f"{n}:{' '.join(headers[n].strip().split())}\n" for n in names)
    signed = ";".join(names)
    canonical = "\n".join([method, path, query, canonical_headers, signed, payload_hash])
    day = now.strftime("%Y%m%d")
    scope = f"{day}/{region}/{service}/aws4_request"
    to_sign = "\n".join(["AWS4-HMAC-SHA256", now.strftime("%Y%m%dT%H%M%SZ"), scope,
                         hashlib.sha256(canonical.encode()).hexdigest()])
    k = hmac.new(f"AWS4{secret}".encode(), day.encode(), hashlib.sha256).digest()
    for part in (region, service, "aws4_request"):
        k = hmac.new(k, part.encode(), hashlib.sha256).digest()
    signature = hmac.new(k, to_sign.encode(), hashlib.sha256).hexdigest()
    return f"AWS4-HMAC-SHA256 Credential={access}/{scope}, SignedHeaders={signed}, Signature={signature}"
