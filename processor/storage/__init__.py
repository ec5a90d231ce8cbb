"""Storage: the backends, claims and leases, the key layout, retirement of manifests."""
