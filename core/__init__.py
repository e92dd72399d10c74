"""The lowest layer: settings, errors, shared rules and the strategy registry; imports nothing of moerge."""
