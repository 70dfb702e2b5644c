"""Typed configuration: YAML -> frozen dataclasses, validated once at the edge.

Schemas live beside the role that owns them (``common.wire.federation`` for
what both sides share). Load with :func:`load_config`; write the resolved form
next to results with :func:`write_resolved`; change a loaded config from a
command line with :func:`apply_settings` (``--set KEY=VALUE``).
"""

from common.config.loader import (
    apply_settings,
    bounded,
    config_to_dict,
    from_mapping,
    load_config,
    load_yaml,
    path_field,
    replace_validated,
    write_resolved,
)

__all__ = [
    "apply_settings",
    "bounded",
    "config_to_dict",
    "from_mapping",
    "load_config",
    "load_yaml",
    "path_field",
    "replace_validated",
    "write_resolved",
]
