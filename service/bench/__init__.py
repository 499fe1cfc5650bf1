"""Load generators: REST and gRPC sweeps, open-loop rates, streams, and the raw engine beside them."""
