"""The FedFM Kubernetes operator (kopf) and the Python side of its CRDs."""
