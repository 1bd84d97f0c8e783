"""jest-curate: joint example selection (JEST) for image-text data, on Apache Beam."""
__version__ = "0.1.0"
