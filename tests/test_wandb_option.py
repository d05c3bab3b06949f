"""Weights & Biases logging is optional: off by default, and a clear config error when asked for but absent."""

from __future__ import annotations

import importlib.util

import pytest

from sdt_dist.config import ConfigError
from tests.helpers import make_cfg


def test_off_by_default():
    assert make_cfg().logging.wandb is False


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed here")
def test_enabled_without_the_package_is_a_config_error_naming_the_key():
    with pytest.raises(ConfigError, match=r"^logging\.wandb: .*pip install 'sdt-dist\[wandb\]'"):
        make_cfg("logging.wandb=true")
