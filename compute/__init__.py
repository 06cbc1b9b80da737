"""sitiancal.compute layer."""
