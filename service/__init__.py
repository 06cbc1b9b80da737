"""sitiancal.service layer."""
