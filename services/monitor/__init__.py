"""The monitor microservice: online metrics of what was served, drift alerts, challenger evaluations."""
