"""The controller microservice: the closed loop's policy (drift → retrain → shadow → promote or discard)."""
