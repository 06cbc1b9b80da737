"""sitiancal.api layer."""
