from .jamba import from_jamba, jamba_config_to_mixcon

__all__ = ["from_jamba", "jamba_config_to_mixcon"]
