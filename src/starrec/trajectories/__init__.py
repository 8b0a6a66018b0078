"""Teacher run records, their serialisation to the student language, filters and datasets."""
