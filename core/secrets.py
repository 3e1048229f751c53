"""What a secret is, in one place: worker variable names, key shapes, secret values.

Three consumers must agree on it, and used to each keep their own list:

- the command environment (``activities/terminal/policy.py``): a command never
  inherits a secret variable unless the operator passes its name through;
- redaction (``core/redaction.py``): every secret value of the worker,
  and anything shaped like a key, is cut from text before it is recorded;
- the worker's own logs, spans and error messages, through ``redact``;
- spec validation (``core/validation.py``): a spec is stored in workflow
  history in clear, so a field named like a credential (``is_secret_field``) or
  a value shaped like one (``looks_like_secret``) is refused;
- helper programs the worker starts (the embedded ``temporal`` dev server):
  they get ``child_environment``, an allow-list, never the worker's secrets.

A name is a secret when its *value* is a credential (or points at one: a key
file, an agent socket). Endpoints and ordinary settings (``*_BASE_URL``,
``TEMPORAL_ADDRESS``) are not: redacting ``default`` or ``localhost:7233``
from every line of output would shred the text and protect nothing. A URL is
a secret wherever it carries a password (``postgres://user:pw@db/x``),
whatever its variable is called.

Stdlib only: the CLI and the worker import it before anything else. Spec
validation runs inside the workflow sandbox too, so nothing here reads the
process's environment, a file or a clock: callers pass the environment in.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from urllib.parse import unquote, urlsplit

__all__ = [
    "BASE_ENV_NAMES",
    "BASE_ENV_PREFIXES",
    "CHILD_ENV_NAMES",
    "MIN_SECRET_CHARS",
    "SECRET_FIELD",
    "SECRET_NAMES",
    "SECRET_SHAPES",
    "SECRET_SUFFIXES",
    "child_environment",
    "is_secret_field",
    "is_secret_name",
    "looks_like_secret",
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
    # Not inside a word: "risk-assessment-plan" and "task-definitions" are text.
    r"(?<![A-Za-z0-9])sk-[A-Za-z0-9][A-Za-z0-9_\-]{7,}"  # OpenAI, Anthropic (sk-ant-...)
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
    _URL_PASSWORD := re.compile(
        r"(\b[A-Za-z][A-Za-z0-9+.\-]{0,30}://[^\s/:@]{0,256}:)[^\s/@]{1,512}(?=@)"
    ),
)


# The words that make a document's field name a credential's ("api_key",
# "clientSecret", "db-password", "Authorization"), wherever they appear in it.
# Spec fields are free-form (headers, ``env``, provider options), so this is a
# search, unlike the exact names of worker variables above; every secret
# suffix is one of its words. Not every secret *name*: a step's ``env`` may
# well set DATABASE_URL to a local file, and a password in it is a value shape.
# "tokens" is not one: ``max_tokens`` is a budget.
SECRET_FIELD: re.Pattern[str] = re.compile(
    r"api[_-]?key|secret|password|passwd|passphrase|token(?!s)|authorization|credential"
    r"|private[_-]?key|access[_-]?key|key[_-]?data|auth[_-]?header",
    re.IGNORECASE,
)

# What a helper program the worker starts may see of the worker's environment:
# where programs are, whose home, language, time zone and temp dir (plus every
# LC_* locale variable), the Go runtime's resource limits (the `temporal` CLI
# is a Go program and a container may cap its CPUs and memory), and what a
# Windows process needs to start at all. Nothing else: an allow-list, because
# a deny-list lets through whatever secret nobody thought to name.
# The POSIX part is also the base of every command's environment
# (activities/terminal/policy.py), so both allow-lists grow together.
BASE_ENV_NAMES: frozenset[str] = frozenset(
    {"PATH", "HOME", "USER", "LOGNAME", "LANG", "LANGUAGE", "TERM", "TZ", "TMPDIR"}
)
BASE_ENV_PREFIXES = ("LC_",)
CHILD_ENV_NAMES: frozenset[str] = BASE_ENV_NAMES | frozenset(
    {
        "GOMAXPROCS",
        "GOMEMLIMIT",
        # Windows
        "SYSTEMROOT",
        "WINDIR",
        "COMSPEC",
        "PATHEXT",
        "USERPROFILE",
        "APPDATA",
        "LOCALAPPDATA",
        "TEMP",
        "TMP",
    }
)

# An Authorization header's credential as it is written: "Bearer" then a token.
_BEARER_CREDENTIAL = re.compile(r"\bBearer\s+[A-Za-z0-9._~+/\-]{16,}")


def is_secret_name(name: str) -> bool:
    """Whether a worker variable's value is a credential (or leads to one)."""
    upper = name.upper()
    return upper in SECRET_NAMES or upper.endswith(SECRET_SUFFIXES)


def is_secret_field(name: str) -> bool:
    """Whether a document's field name says its value is a credential."""
    return SECRET_FIELD.search(name) is not None


def looks_like_secret(text: str) -> bool:
    """Whether ``text`` holds something shaped like a key, token or private key.

    The shapes redaction cuts (``SECRET_SHAPES``), a URL with a password, and
    an HTTP bearer credential. Stricter than redaction's "bearer ..." on
    purpose: redacting a word too many costs a word, refusing a spec whose
    prompt says "bearer instruments" costs the user their run.
    """
    return any(
        shape.search(text) is not None
        for shape in (SECRET_SHAPES, _BEARER_CREDENTIAL, _URL_PASSWORD)
    )


def child_environment(
    environ: Mapping[str, str], names: Iterable[str] = CHILD_ENV_NAMES
) -> dict[str, str]:
    """What a helper program the worker starts may see of ``environ``.

    Only ``names`` (and ``LC_*``), and never a secret-named one, even if listed.
    Windows spells variable names in any case, so names compare in upper case.
    """
    allowed = {name.upper() for name in names}
    return {
        name: value
        for name, value in environ.items()
        if (name.upper() in allowed or name.upper().startswith(BASE_ENV_PREFIXES))
        and not is_secret_name(name)
    }


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
