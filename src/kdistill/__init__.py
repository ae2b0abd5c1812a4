"""kdistill: distill large language models into small ones, and measure what they kept."""

__version__ = "0.1.0"
