"""Tiny validating readers for settings that come from the environment."""

import os
from pathlib import Path

from django.core.exceptions import ImproperlyConfigured


def envbool(name: str, default: bool) -> bool:
    value = os.environ.get(name, "")
    if value == "":
        return default
    if value.lower() in ("1", "true", "yes", "on"):
        return True
    if value.lower() in ("0", "false", "no", "off"):
        return False
    raise ImproperlyConfigured(f"{name} must be true or false, not {value!r}")


# The largest whole-number setting: a database integer (and a lease's seconds a date can hold).
MAX_SETTING = 2**31 - 1


def envint(name: str, default: int, minimum: int = 0) -> int:
    value = os.environ.get(name, "")
    if value == "":
        return default
    try:
        number = int(value)
    except ValueError:
        raise ImproperlyConfigured(f"{name} must be a whole number, not {value!r}") from None
    if number < minimum:
        raise ImproperlyConfigured(f"{name} must be at least {minimum}, not {number}")
    if number > MAX_SETTING:
        raise ImproperlyConfigured(f"{name} must be at most {MAX_SETTING:,}, not {number}")
    return number


def envpath(name: str, default: Path) -> Path:
    value = os.environ.get(name, "")
    path = Path(value).expanduser() if value else default
    if value and not path.is_absolute():
        path = Path.cwd() / path
    if path.exists() and not path.is_dir():
        raise ImproperlyConfigured(f"{name} must name a folder; {path} is a file")
    return path


def envpaths(name: str) -> list[Path]:
    """Folders separated by the OS path separator (':' on Linux)."""
    value = os.environ.get(name, "")
    paths = []
    for part in filter(None, value.split(os.pathsep)):
        path = Path(part).expanduser()
        if not path.is_dir():
            raise ImproperlyConfigured(f"{name}: {part!r} is not an existing folder")
        paths.append(path.resolve())
    return paths


def envurl(name: str) -> str:
    """An http(s) URL, or "" when unset."""
    value = os.environ.get(name, "").strip()
    if value and not value.lower().startswith(("http://", "https://")):
        raise ImproperlyConfigured(f"{name} must be an http:// or https:// URL, not {value!r}")
    return value


# Hypervisor's own secrets, which no agent is given (`--pass-env`, a profile's pass_env).
SERVER_SECRETS = {"SECRET_KEY", "DATABASE_URL", "HUEY_REDIS_URL", "HYPERVISOR_METRICS_TOKEN",
                  "HYPERVISOR_HERD_WEBHOOK"}  # fmt: skip


def server_secrets_in(names) -> str:
    """Why these names may not be passed to an agent, or ""."""
    ours = sorted(SERVER_SECRETS.intersection(names))
    return f"{', '.join(ours)}: Hypervisor's own secrets never reach an agent" if ours else ""
