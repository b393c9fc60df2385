"""Extension handlers vmvault ships for its VM agent (docs/agent-protocol.md, section 4)."""
