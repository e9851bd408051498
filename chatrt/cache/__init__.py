"""What is kept and where: one KV (kv), the shared prefixes (prefix), which KV a turn starts from (reuse), the
tier ladder's policy (ladder) and its movers (tiers), restore-or-recompute (cost), Redis (store, journal,
leases, integrity) and what a stored session is (record). Nothing here imports the engine or a face."""
