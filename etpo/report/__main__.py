"""``python -m etpo.report <folder> --out <dir>``: see :mod:`etpo.report`."""

from etpo.report import main

if __name__ == "__main__":
    raise SystemExit(main())
