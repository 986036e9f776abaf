"""peftlab: comparative parameter-efficient fine-tuning studies, done right and fast."""

__version__ = "0.1.0"
