"""Settings, read from the environment in one place.

Every knob is a ``MOERGE_*`` variable; :meth:`Settings.from_env` is the only reader.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

GiB = 1024**3


def _int_env(env: dict[str, str], name: str, default: int) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError as exc:
        raise ValueError(f"{name} must be an integer, got {raw!r}") from exc


@dataclass(frozen=True)
class Settings:
    home: Path = field(metadata={"help": "data directory: database, artifact store, converted models"})
    database_url: str = field(
        metadata={"help": "SQLAlchemy async URL (sqlite+aiosqlite or postgresql+asyncpg)"}
    )
    import_roots: tuple[Path, ...] = field(
        metadata={"help": "folders the API may import experts from by path"}
    )
    max_upload_bytes: int = field(default=8 * GiB, metadata={"help": "largest request body accepted"})
    max_unpacked_bytes: int = field(
        default=16 * GiB, metadata={"help": "largest total size an archive may unpack to"}
    )
    admin_key: str | None = field(default=None, metadata={"help": "first admin key for `moerge init`"})
    host: str = field(default="127.0.0.1", metadata={"help": "address `moerge serve` binds"})
    port: int = field(default=8000, metadata={"help": "port `moerge serve` binds"})

    @property
    def store_dir(self) -> Path:
        return self.home / "store"

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> Settings:
        env = dict(os.environ if environ is None else environ)
        home = Path(env.get("MOERGE_HOME") or Path.home() / ".moerge").expanduser().resolve()
        database_url = env.get("MOERGE_DATABASE_URL") or f"sqlite+aiosqlite:///{home / 'moerge.db'}"
        roots_raw = env.get("MOERGE_IMPORT_ROOTS")
        roots = (
            tuple(Path(p).expanduser().resolve() for p in roots_raw.split(os.pathsep) if p)
            if roots_raw
            else (home / "imports",)
        )
        return cls(
            home=home,
            database_url=database_url,
            import_roots=roots,
            max_upload_bytes=_int_env(env, "MOERGE_MAX_UPLOAD_BYTES", 8 * GiB),
            max_unpacked_bytes=_int_env(env, "MOERGE_MAX_UNPACKED_BYTES", 16 * GiB),
            admin_key=env.get("MOERGE_ADMIN_KEY") or None,
            host=env.get("MOERGE_HOST", "127.0.0.1"),
            port=_int_env(env, "MOERGE_PORT", 8000),
        )
