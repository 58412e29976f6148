"""`python -m services.learner`."""

from __future__ import annotations

from services.learner.app import main

if __name__ == "__main__":
    main()
