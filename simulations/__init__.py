"""Local federated simulations: partitioners, scenarios, sweeps, reports."""
