"""Settings: typed models, the YAML/environment loader and its errors."""

from config.loader import ConfigError, config_path, load_settings
from config.settings import Settings

__all__ = ["ConfigError", "Settings", "config_path", "load_settings"]
