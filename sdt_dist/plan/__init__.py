"""sdt-plan: per-rank memory and throughput of a configuration and layout, computed before launching."""
