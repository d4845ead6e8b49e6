"""Change-detection and change-captioning networks (torch). Import submodules directly, e.g.
``from changescribe.core.models.registry import build_model, list_models``."""
