"""Entry point: ``dicom-bq-export`` (also ``python -m pipeline.main``).

    dicom-bq-export inspect FILE...         what each file becomes (JSON lines)
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "inspect":
        from pipeline import inspect

        return inspect.run(argv[1:])
    print("usage: dicom-bq-export inspect FILE...", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
