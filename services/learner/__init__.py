"""The learner microservice: online River learning with prequential metrics and signed model versions."""
