"""`python -m services.predictor`."""

from __future__ import annotations

from services.predictor.app import main

if __name__ == "__main__":
    main()
