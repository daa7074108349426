"""pacs-vault: a storage-tier and data-protection appliance for medical images."""

__version__ = "0.1.0"
