"""`python -m services.controller`."""

from __future__ import annotations

from services.controller.app import main

if __name__ == "__main__":
    main()
