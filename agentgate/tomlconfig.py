"""Shared TOML config reading: one-line errors naming the file and the bad key."""
from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any


class ConfigError(Exception):
    """Bad configuration; the message is one line, fit for a person."""


def read_toml(path: str | os.PathLike) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except OSError as exc:
        raise ConfigError(f"{path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None


class Section:
    """Typed access to one table of a config file; unknown keys are errors, not ignored."""

    def __init__(self, data: dict[str, Any], where: str, base: Path | None = None):
        self.data = data
        self.where = where
        self.base = base  # relative paths are taken from here (the config file's folder)
        self._seen: set[str] = set()

    def get(self, key: str, typ: type | tuple[type, ...], default: Any = None) -> Any:
        self._seen.add(key)
        if key not in self.data:
            return default
        value = self.data[key]
        if typ is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, typ) or (isinstance(value, bool) and typ is not bool):
            names = typ.__name__ if isinstance(typ, type) else " or ".join(t.__name__ for t in typ)
            raise ConfigError(f"{self.where}: '{key}' must be {names}, not {type(value).__name__}")
        return value

    def path(self, key: str, default: str | None = None) -> str | None:
        value = self.get(key, str, default)
        if not value:
            return value
        p = Path(value).expanduser()
        return str(self.base / p if self.base and not p.is_absolute() else p)

    def table(self, key: str) -> "Section":
        return Section(self.get(key, dict, {}), f"{self.where} [{key}]", self.base)

    def tables(self, key: str) -> list["Section"]:
        items = self.get(key, list, [])
        out = []
        for i, item in enumerate(items, 1):
            if not isinstance(item, dict):
                raise ConfigError(f"{self.where}: [[{key}]] entry {i} must be a table")
            out.append(Section(item, f"{self.where} [[{key}]] #{i}", self.base))
        return out

    def done(self) -> None:
        unknown = sorted(set(self.data) - self._seen)
        if unknown:
            raise ConfigError(f"{self.where}: unknown key '{unknown[0]}'")


def read_secret(section: "Section", path: str) -> str:
    """A token kept in a file of its own (so it stays out of the config and `ps`)."""
    try:
        return Path(path).read_text().strip()
    except OSError as exc:
        raise ConfigError(f"{section.where}: cannot read token_file {path}: {exc.strerror}") from None


def private_dir(path: str | os.PathLike) -> Path:
    """Create `path` and any missing parents as 0700: recordings and spools are for root
    (or their user) alone."""
    p = Path(path)
    missing = []
    while not p.exists():
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        try:
            d.mkdir(mode=0o700)
        except FileExistsError:
            pass
    return Path(path)


def default_state_dir() -> Path:
    """/var/lib/agentgate as root, else the user's XDG data dir."""
    if os.geteuid() == 0:
        return Path("/var/lib/agentgate")
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "agentgate"
