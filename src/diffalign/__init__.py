"""diffalign: align diffusion models with rewards, preferences and constraints."""

__version__ = "0.1.0"
