"""``python -m fxcondensa``: the same command as the ``fxcondensa`` console script."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
