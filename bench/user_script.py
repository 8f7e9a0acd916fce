"""The script a user would write instead: top-level header keywords of every file in a folder, into DuckDB.

    python bench/user_script.py FOLDER DATABASE.duckdb
"""
import sys
from pathlib import Path

import duckdb
import pandas as pd
import pydicom

folder, database = Path(sys.argv[1]), sys.argv[2]
records = []
for path in sorted(p for p in folder.rglob("*") if p.is_file()):
    ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
    records.append({elem.keyword: str(elem.value) for elem in ds if elem.keyword and elem.VR != "SQ"})
parquet = database + ".parquet"
pd.DataFrame(records).to_parquet(parquet)
with duckdb.connect(database) as con:
    con.execute(f"CREATE OR REPLACE TABLE instances AS SELECT * FROM '{parquet}'")
