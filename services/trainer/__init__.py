"""The trainer microservice: scikit-learn batch training on exact slices of a pipeline's topics."""
