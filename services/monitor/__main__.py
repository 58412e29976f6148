"""`python -m services.monitor`."""

from __future__ import annotations

from services.monitor.app import main

if __name__ == "__main__":
    main()
