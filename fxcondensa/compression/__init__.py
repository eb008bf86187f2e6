"""The verbs: ``compress`` (a scheme applied to a copy of the model) and ``thin`` (compress, then remove the
pruned channels with the thinning pass and check the result)."""

from .apply import compress, density, layer_densities
from .thinning import thin

__all__ = ["compress", "density", "layer_densities", "thin"]
