"""Profiles: named parameter sets for each notebook (smoke for CI, cpu for the main job, gpu).

profiles/<profile>/<notebook>.yaml contains the papermill parameters of one notebook in one profile.
"""

from pathlib import Path

import yaml

from .paths import PROFILES_DIR

PROFILES = ("smoke", "cpu", "gpu")


def check_profile(profile: str) -> str:
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; use one of {', '.join(PROFILES)}")
    return profile


def profile_parameters(profile: str, notebook: str, profiles_dir: Path = PROFILES_DIR) -> dict:
    """Return the parameters that `profile` sets for `notebook` (a notebook file stem)."""
    check_profile(profile)
    path = Path(profiles_dir) / profile / f"{notebook}.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"profile {profile!r} has no parameters for notebook {notebook!r} (expected {path})")
    with open(path, encoding="utf-8") as handle:
        params = yaml.safe_load(handle) or {}
    if params.get("profile") != profile:
        raise ValueError(f"{path} must set profile: {profile}, found {params.get('profile')!r}")
    return params
