"""Graph passes: annotation of parameters, channel analysis, thinning, profiling."""
