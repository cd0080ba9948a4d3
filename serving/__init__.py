"""What the services share at their edge: dyspec <-> wire conversions, the gRPC server frame
(limits, health, reflection, drain), TLS credentials from PEM files, status-coded errors and model
loading from a folder or factory."""
