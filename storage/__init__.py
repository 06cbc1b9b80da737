"""sitiancal.storage layer."""
