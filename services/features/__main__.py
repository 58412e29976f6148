"""`python -m services.features`."""

from __future__ import annotations

from services.features.app import main

if __name__ == "__main__":
    main()
