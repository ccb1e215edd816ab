"""`ferry predict`: batch scoring of a whole file with an artifact's served variant, locally or on Ray Data."""
