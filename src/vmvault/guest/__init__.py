"""The guest side: the VM agent (vmvault-agent) and what it shares with the server."""
