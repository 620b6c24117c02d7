"""The Models pane: the list of models found on disk and the selected model's details."""

from .detail import ModelDetail
from .model_list import ModelBrowser

__all__ = ["ModelBrowser", "ModelDetail"]
