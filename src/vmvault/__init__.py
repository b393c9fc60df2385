"""vmvault: self-hosted Azure Backup for Linux virtual machines."""

__version__ = "0.1.0"
