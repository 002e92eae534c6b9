"""mirrorlab: GBMPO (GRPO with Bregman-divergence regularisers) and the search over mirror maps."""

__version__ = "0.1.0"
