"""Writing and reading models: atomic writes, compact compressed files, thinned-model recipes, exports.
"""
