"""/api/keys: list, create, get, revoke and rotate API keys (admin scope)."""
