"""What a secret is, in one place: worker variable names, key shapes, secret values.

Three consumers must agree on it, and used to each keep their own list:

- the command environment (``activities/command_policy.py``): a command never
  inherits a secret variable unless the operator passes its name through;
- redaction (``activities/redaction.py``): every secret value of the worker,
  and anything shaped like a key, is cut from text before it is recorded;
- the worker's own logs, spans and error messages, through ``redact``.

A name is a secret when its *value* is a credential (or points at one: a key
file, an agent socket). Endpoints and ordinary settings (``*_BASE_URL``,
``TEMPORAL_ADDRESS``) are not: redacting ``default`` or ``localhost:7233``
from every line of output would shred the text and protect nothing. A URL is
a secret wherever it carries a password (``postgres://user:pw@db/x``),
whatever its variable is called.

Stdlib only: the CLI and the worker import it before anything else.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from urllib.parse import unquote, urlsplit

__all__ = [
    "MIN_SECRET_CHARS",
    "SECRET_NAMES",
    "SECRET_SHAPES",
    "SECRET_SUFFIXES",
    "is_secret_name",
    "secret_values",
    "url_password",
]

# Credentials the worker itself reads, and well-known ones of the tools around it.
SECRET_NAMES: frozenset[str] = frozenset(
    {
        # Provider keys.
        "ANTHROPIC_API_KEY",
        "ANTHROPIC_AUTH_TOKEN",
        "OPENAI_API_KEY",
        "OPENAI_ADMIN_KEY",
        "GEMINI_API_KEY",
        "GOOGLE_API_KEY",
        "GOOGLE_APPLICATION_CREDENTIALS",
        # Temporal: Cloud API key and mTLS client key (data or file).
        "TEMPORAL_API_KEY",
        "TEMPORAL_TLS_CLIENT_KEY_DATA",
        "TEMPORAL_TLS_CLIENT_KEY_PATH",
        "TEMPORAL_TLS_KEY",
        "TEMPORAL_TLS_KEY_DATA",
        "TEMPORAL_TLS_KEY_PATH",
        # llmmixer's own: payload encryption key, HTTP API token.
        "LLMMIXER_PAYLOAD_KEY",
        "LLMMIXER_API_TOKEN",
        # OpenTelemetry exporter headers carry the collector's auth token.
        "OTEL_EXPORTER_OTLP_HEADERS",
        "OTEL_EXPORTER_OTLP_TRACES_HEADERS",
        "OTEL_EXPORTER_OTLP_METRICS_HEADERS",
        "OTEL_EXPORTER_OTLP_LOGS_HEADERS",
        # Cloud and infrastructure credentials commonly present on a host.
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "AZURE_CLIENT_SECRET",
        "DATABASE_URL",
        "REDIS_URL",
        "SSH_AUTH_SOCK",
        "GPG_AGENT_INFO",
        "DOCKER_AUTH_CONFIG",
        "NPM_TOKEN",
        "PGPASSWORD",
        "MYSQL_PWD",
    }
)
SECRET_SUFFIXES: tuple[str, ...] = (
    "_API_KEY",
    "_APIKEY",
    "_KEY_DATA",
    "_TOKEN",
    "_SECRET",
    "_SECRET_KEY",
    "_ACCESS_KEY",
    "_PRIVATE_KEY",
    "_PASSWORD",
    "_PASSWD",
    "_PASSPHRASE",
    "_CREDENTIALS",
    "_AUTH_HEADER",
)

# Values shorter than this are never treated as secrets: replacing them would
# shred ordinary text ("1", "yes"), and they are not real keys.
MIN_SECRET_CHARS = 4

# Shapes of keys that must never be recorded even when they are not one of the
# worker's (a provider echoing some other key, a key pasted in a prompt, a
# command printing a token it found in a file). Each is linear-time: they run
# over whole command outputs.
SECRET_SHAPES: re.Pattern[str] = re.compile(
    r"sk-[A-Za-z0-9][A-Za-z0-9_\-]{7,}"  # OpenAI, Anthropic (sk-ant-...)
    r"|AIza[0-9A-Za-z_\-]{20,}"  # Google API keys
    r"|\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"  # AWS access key ids
    r"|\bgh[pousr]_[A-Za-z0-9]{30,}"  # GitHub tokens
    r"|\bgithub_pat_[A-Za-z0-9_]{30,}"  # GitHub fine-grained tokens
    r"|\bxox[abprs]-[A-Za-z0-9\-]{10,}"  # Slack tokens
    # A PEM private key block, up to its end line (or as far as it goes).
    r"|-----BEGIN [A-Z0-9 ]{0,40}PRIVATE KEY-----(?:[A-Za-z0-9+/=\s:,.]|-(?!----))*"
    r"(?:-----END [A-Z0-9 ]{0,40}PRIVATE KEY-----)?"
)
# Shapes whose first group is kept and the credential after it replaced.
PREFIXED_SECRET_SHAPES: tuple[re.Pattern[str], ...] = (
    re.compile(r"(?i)(bearer\s+)[A-Za-z0-9._~+/\-]{8,}=*"),
    re.compile(r"(?i)([?&](?:key|api_key|api-key|access_token|token)=)[^&\s\"']+"),
    # The password of a URL's userinfo: scheme://user:PASSWORD@host
    re.compile(r"(\b[A-Za-z][A-Za-z0-9+.\-]{0,30}://[^\s/:@]{0,256}:)[^\s/@]{1,512}(?=@)"),
)


def is_secret_name(name: str) -> bool:
    """Whether a worker variable's value is a credential (or leads to one)."""
    upper = name.upper()
    return upper in SECRET_NAMES or upper.endswith(SECRET_SUFFIXES)


def url_password(value: str) -> str | None:
    """The password in a URL's userinfo (``scheme://user:pw@host``), if any."""
    if "://" not in value or "@" not in value:
        return None
    try:
        password = urlsplit(value.strip()).password
    except ValueError:
        return None
    return password or None


def secret_values(environ: Mapping[str, str]) -> frozenset[str]:
    """Every secret value in ``environ``, for redaction.

    The values of secret-named variables, and of any variable holding a URL
    with a password, plus that password alone (raw and percent-decoded) so a
    command that prints only the password is caught too.
    """
    found: set[str] = set()

    def add(values: Iterable[str | None]) -> None:
        for value in values:
            if value and len(value.strip()) >= MIN_SECRET_CHARS:
                found.add(value)
                found.add(value.strip())

    for name, value in environ.items():
        password = url_password(value)
        if password is not None:
            add((value, password, unquote(password)))
        elif is_secret_name(name):
            add((value,))
    return frozenset(found)
