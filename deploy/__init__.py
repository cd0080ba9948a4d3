"""Deployment: Ray cluster launch and Kubernetes manifests that start the services entry points."""
