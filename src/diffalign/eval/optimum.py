"""The exact KL-regularised optimum on `toy2d` (METHODS.md, last section); the math lives with
the model it is computed from (`diffalign.models.toy2d`), re-exported here for evaluation code."""

from ..models.toy2d import distance_to_optimum, optimum_log_prob, sample_optimum, tilted_mixture

__all__ = ["distance_to_optimum", "optimum_log_prob", "sample_optimum", "tilted_mixture"]
