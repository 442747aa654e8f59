"""Operating a running broker: the operations listener (``http_api``) with
Prometheus metrics and health checks."""
