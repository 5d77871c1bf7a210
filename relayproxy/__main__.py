"""``python -m relayproxy``: the same as the ``relayproxy`` command."""

from relayproxy.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
