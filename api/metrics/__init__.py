"""GET /metrics (Prometheus text format, admin key or MOERGE_METRICS_TOKEN), the middleware that counts every
request, what /v1 records (model kind, routing, tokens, time to first token, member failures), and the per-minute
rollups behind the admin dashboard's charts. The metrics themselves are defined in core/metrics.py."""
