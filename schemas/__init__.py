"""Schema rules: the VR → BigQuery type table, instance flattening and schema merging.

Everything in this package is pure Python (pydicom, no Beam), so it can be used and
tested on its own and called from any Beam transform.
"""
