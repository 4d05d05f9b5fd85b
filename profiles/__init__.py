"""Organ profiles: data (``*.yaml``) and their validated schema."""

from segnode.profiles.loader import load_all, load_profile, load_profile_file, profile_paths
from segnode.profiles.schema import Backend, Code, Profile, Tissue

__all__ = [
    "Backend", "Code", "Profile", "Tissue",
    "load_all", "load_profile", "load_profile_file", "profile_paths",
]
