"""Connecting to Redis (the state store's, and the broker's): URLs with their secrets masked, TLS
options, and one clear line for each way a connection fails.

``redis://:password@host:port/db`` and ``rediss://`` (TLS) URLs work for both the state store
(redis-py) and Celery's broker; the same options serve both. Nothing printed ever shows a password.
"""

from __future__ import annotations

import logging
import re
import ssl
from pathlib import Path
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

import redis

from lipfarm.common.errors import InputError, ServiceError

TLS_CA_ENV = "LIPFARM_REDIS_TLS_CA_FILE"
# The TLS parameters a rediss:// URL may carry (redis-py's and Celery's names for them).
TLS_URL_PARAMS = ("ssl_cert_reqs", "ssl_ca_certs", "ssl_certfile", "ssl_keyfile")
_CERT_REQS = {"required": ssl.CERT_REQUIRED, "cert_required": ssl.CERT_REQUIRED,
              "optional": ssl.CERT_OPTIONAL, "cert_optional": ssl.CERT_OPTIONAL,
              "none": ssl.CERT_NONE, "cert_none": ssl.CERT_NONE}
_SECRET_QUERY = re.compile(r"(?i)([?&][^=&]*(?:pass|secret|token)[^=&]*=)[^&#]*")


def mask_url(url: str) -> str:
    """``url`` fit to print: the password (and any ``password=``-like query value) replaced by ``***``.

    ``redis://:s3cret@host:6379/0`` -> ``redis://:***@host:6379/0``; a user name before a ``:`` is
    kept, user info without one is masked whole (it may be a password). Never raises.
    """
    text = str(url)
    try:
        parts = urlsplit(text)
        netloc = parts.netloc
        if "@" in netloc:
            userinfo, _, hostport = netloc.rpartition("@")
            user, colon, _ = userinfo.partition(":")
            netloc = f"{user}:***@{hostport}" if colon else f"***@{hostport}"
        text = urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))
    except ValueError:  # not parseable as a URL: mask anything that looks like user info
        text = re.sub(r"://[^/@]*@", "://***@", text)
    return _SECRET_QUERY.sub(r"\1***", text)


def _tls_params(url: str) -> dict[str, str]:
    return {key: unquote(value) for key, value in parse_qsl(urlsplit(url).query, keep_blank_values=True)
            if key in TLS_URL_PARAMS}


def redis_tls_options(url: str, ca_file: str = "") -> dict:
    """Keyword options of a TLS connection to the Redis at ``url`` ({} for plain ``redis://``).

    For ``rediss://``: the URL's ``ssl_*`` parameters, else ``ca_file`` (``LIPFARM_REDIS_TLS_CA_FILE``)
    as the CA, and certificates required unless the URL says otherwise. The same dict serves
    redis-py (``Redis.from_url(url, **options)``) and Celery (``broker_use_ssl``,
    ``redis_backend_use_ssl``). Raises ``InputError`` for TLS asked of a plain URL, an unknown
    ``ssl_cert_reqs`` or a CA, certificate or key file that does not exist.
    """
    scheme = urlsplit(url).scheme
    params = _tls_params(url)
    if scheme != "rediss":
        if scheme == "redis" and params:
            raise InputError("TLS parameters on a plain-text Redis URL", field=", ".join(sorted(params)),
                             expected="a rediss:// URL", found=mask_url(url))
        if scheme == "redis" and ca_file:
            raise InputError(f"{TLS_CA_ENV} is set but this Redis URL is plain text", field=TLS_CA_ENV,
                             expected="rediss:// URLs", found=mask_url(url))
        return {}
    reqs_text = params.get("ssl_cert_reqs", "required").strip().lower()
    if reqs_text not in _CERT_REQS:
        raise InputError("unknown certificate requirement", field="ssl_cert_reqs",
                         expected="required | optional | none", found=mask_url(url))
    options: dict = {"ssl_cert_reqs": _CERT_REQS[reqs_text]}
    ca = params.get("ssl_ca_certs") or ca_file
    if ca:
        options["ssl_ca_certs"] = ca
    for key in ("ssl_certfile", "ssl_keyfile"):
        if params.get(key):
            options[key] = params[key]
    for key in ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile"):
        if key in options and not Path(options[key]).is_file():
            where = TLS_CA_ENV if key == "ssl_ca_certs" and not params.get(key) else f"{key} in the Redis URL"
            raise InputError("file not found", path=options[key], field=where)
    return options


def url_without_tls_params(url: str) -> str:
    """``url`` without its ``ssl_*`` query parameters (Celery gets them as ``*_use_ssl`` options)."""
    parts = urlsplit(url)
    query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k not in TLS_URL_PARAMS]
    return urlunsplit((parts.scheme, parts.netloc, parts.path, urlencode(query), parts.fragment))


def _password(url: str) -> str | None:
    try:
        parts = urlsplit(url)
    except ValueError:
        return None
    query = dict(parse_qsl(parts.query))
    return parts.password or query.get("password") or None


def _tls_failure(exc: BaseException) -> bool:
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLError):
            return True
        seen = seen.__cause__ or seen.__context__
    return "[SSL" in str(exc) or "SSL:" in str(exc)


def redis_failure(url: str, exc: BaseException) -> str:
    """One line saying why the Redis at ``url`` refused us: credentials, TLS, or unreachable.

    The URL is masked; the line names what to check.
    """
    where = mask_url(url)
    detail = " ".join(mask_url(str(exc)).split()) or exc.__class__.__name__
    if isinstance(exc, redis.AuthenticationError) or any(
            code in str(exc) for code in ("WRONGPASS", "NOAUTH", "invalid password", "Authentication required")):
        if _password(url) is None:
            return f"Redis at {where} requires a password and the URL gives none ({detail})"
        return f"Redis at {where} refused the credentials ({detail}); check the password in the URL"
    if _tls_failure(exc):
        return (f"TLS handshake with Redis at {where} failed ({detail}); check the CA certificate "
                f"({TLS_CA_ENV} or ?ssl_ca_certs=) and that the server speaks TLS on that port")
    hint = ""
    if urlsplit(url).scheme == "rediss" and isinstance(exc, redis.TimeoutError):
        hint = "; no TLS handshake: does the server speak TLS on that port?"
    elif urlsplit(url).scheme == "redis" and any(text in str(exc) for text in ("reset by peer", "closed by server")):
        hint = "; if the server expects TLS, use a rediss:// URL"
    return f"cannot reach Redis at {where} ({exc.__class__.__name__}: {detail}){hint}"




# --- the eviction policy ------------------------------------------------------------------------------

ALLOW_EVICTING_ENV = "LIPFARM_ALLOW_EVICTING_REDIS"
SAFE_POLICY = "noeviction"


class EvictingRedisError(ServiceError):
    """The Redis may evict keys (its ``maxmemory-policy`` is not ``noeviction``) and that is not accepted."""


def eviction_policy(client: redis.Redis) -> str | None:
    """The server's ``maxmemory-policy``: from ``CONFIG GET``, else from ``INFO memory`` (managed
    Redis often disables CONFIG); None where neither tells."""
    try:
        found = client.config_get("maxmemory-policy")
        if found.get("maxmemory-policy"):
            return str(found["maxmemory-policy"])
    except redis.ResponseError:  # CONFIG renamed away or refused: INFO still says it (Redis >= 3.2)
        pass
    try:
        return str(client.info("memory").get("maxmemory_policy") or "") or None
    except redis.ResponseError:
        return None


def check_eviction_policy(client: redis.Redis, where: str, *, allow: bool) -> str | None:
    """Refuse a Redis that may evict keys: losing some of lipfarm's keys strands jobs no recovery
    pass can see (a job record without its active entry, tokens that vanish). Returns the policy;
    raises ``ServiceError`` (one line: the setting and the fix) unless it is ``noeviction`` or
    ``allow`` (``LIPFARM_ALLOW_EVICTING_REDIS=1``). A server that hides its policy is let through
    with a warning, as BullMQ does."""
    try:
        policy = eviction_policy(client)
    except redis.RedisError as exc:
        raise ServiceError(redis_failure(where, exc)) from None
    if policy is None:
        logging.getLogger(__name__).warning(
            "Redis at %s does not say its maxmemory-policy (CONFIG and INFO refused); lipfarm needs "
            "noeviction", mask_url(where))
    elif policy != SAFE_POLICY and not allow:
        raise EvictingRedisError(
            f"Redis at {mask_url(where)} has maxmemory-policy {policy}: it may evict lipfarm's keys and strand "
            f"jobs; set maxmemory-policy {SAFE_POLICY} (redis.conf, or CONFIG SET maxmemory-policy {SAFE_POLICY}), "
            f"or {ALLOW_EVICTING_ENV}=1 to accept the risk")
    return policy
