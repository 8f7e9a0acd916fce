"""Launch local-bigquery 0.4.0 offline (test-only; see ../shared/notes/local-gcp-emulators.md).

local-bigquery keeps its catalog in DuckLake and asks DuckDB to download extensions at run
time. This launcher installs the extensions shipped as PyPI packages instead, and sets
DuckDB's TimeZone after connecting (which otherwise tries to auto-install icu).
"""

import importlib
import pathlib
import sys

import duckdb

EXT_DIR = str(pathlib.Path(sys.prefix) / "duckdb-extensions")
_orig_connect = duckdb.connect


def _install_bundled_extensions():
    con = _orig_connect(config={"extension_directory": EXT_DIR, "autoinstall_known_extensions": False})
    for name in ("ducklake", "spatial", "httpfs"):
        pkg = importlib.import_module(f"duckdb_extension_{name}")
        path = pathlib.Path(pkg.__file__).parent / "extensions" / f"v{duckdb.__version__}" / f"{name}.duckdb_extension"
        con.execute(f"INSTALL '{path}'")
    con.close()


def _connect(database=":memory:", read_only=False, config=None, **kw):
    cfg = dict(config or {})
    tz = cfg.pop("TimeZone", None)
    cfg.setdefault("extension_directory", EXT_DIR)
    cfg.setdefault("autoinstall_known_extensions", False)
    con = _orig_connect(database, read_only=read_only, config=cfg, **kw)
    if tz:
        con.execute(f"SET TimeZone='{tz}'")
    return con


_install_bundled_extensions()
duckdb.connect = _connect
from local_bigquery.cli import main  # noqa: E402

sys.exit(main())
