"""raysafe: Ray-distributed studies of multilingual safety alignment in LLMs."""

__version__ = "0.1.0"
