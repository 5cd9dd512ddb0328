"""uclr: robust multi-domain recommendation with user-aware contrastive learning."""

__version__ = "0.1.0"
