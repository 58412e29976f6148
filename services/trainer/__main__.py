"""`python -m services.trainer`."""

from __future__ import annotations

from services.trainer.app import main

if __name__ == "__main__":
    main()
