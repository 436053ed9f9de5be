"""Target devices: profiles of the hardware a model is meant to run on.

A profile (``profiles/<name>.toml``) records a device's memory bandwidth, peak compute, RAM, the
share of RAM an app may use, and storage read speed, each with its unit and source, so a latency
or fit prediction can say which figures it rests on. ``get_profile("raspberry-pi-5")`` loads one;
``load_profiles()`` loads all, with user folders (``$EDGEKIT_PROFILES`` or ``extra_dirs``)
overriding built-ins of the same name.
"""

from __future__ import annotations

from edgekit.targets.profiles import (
    DeviceProfile,
    Figure,
    get_profile,
    load_profile,
    load_profiles,
    profile_dirs,
)

__all__ = ["DeviceProfile", "Figure", "get_profile", "load_profile", "load_profiles", "profile_dirs"]
