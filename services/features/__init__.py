"""The features microservice: raw events → validated feature vectors (invalid → dead-letter topic)."""
