"""One-machine research harness: phantom sites, simulated federations, reports."""
