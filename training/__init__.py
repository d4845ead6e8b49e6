"""Training ChangeScribe's models: datasets, one recipe per paper, losses, metrics, export to model files.

Imports ``changescribe.core`` (models, vocabulary, model-file writer); nothing in core/ or plugin/ imports it,
and it is not shipped in the plugin zip.
"""
