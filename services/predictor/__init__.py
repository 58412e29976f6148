"""The predictor microservice: features → predictions with hot-swapped, verified model versions."""
