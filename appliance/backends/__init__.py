"""Storage tiers behind one interface (base.py): filesystem, LTFS tape, S3."""

from __future__ import annotations

from appliance.backends.base import Backend, unwrap  # noqa: F401 - callers say backends.unwrap
from appliance.backends.filesystem import FilesystemBackend
from appliance.backends.ltfs import Cartridge, LtfsBackend
from appliance.backends.wrappers import RateLimitedBackend, RetryingBackend
from appliance.config import Config, TierConfig
from appliance.errors import ConfigError


def open_tier(config: Config, tier: TierConfig) -> Backend:
    """The tier's backend with its retry and bandwidth wrappers."""
    backend: Backend
    if tier.kind == "filesystem":
        backend = FilesystemBackend(tier.name, config.resolve(tier.path), create=False)
    elif tier.kind == "ltfs":
        backend = LtfsBackend(tier.name, [Cartridge(c.label, config.resolve(c.path), c.capacity_mb * 10**6)
                                          for c in tier.cartridges])
    else:
        from appliance.backends.s3 import S3Backend  # boto3 loads slowly; only S3 tiers need it

        if tier.s3 is None:
            raise ConfigError(f"tier {tier.name}: an s3 tier needs its s3 settings")
        backend = S3Backend(tier.name, tier.s3, config.resolve)
    if tier.rate_limit_mbps:
        backend = RateLimitedBackend(backend, tier.rate_limit_mbps * 1e6)
    return RetryingBackend(backend, tier.retries)
