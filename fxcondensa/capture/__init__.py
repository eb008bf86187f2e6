"""Getting a model in: torch.fx and torch.export capture, shape metadata, the records every
later stage writes on nodes, and the generated code of the GraphModules it returns.
The bottom layer: it imports nothing else of fxcondensa but ``errors``.
"""
