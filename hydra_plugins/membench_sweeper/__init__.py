"""membench's Hydra sweeper; Hydra discovers it in the ``hydra_plugins`` namespace."""
