"""Token-level routers: which adapters act on each token in each layer (torch engine)."""
